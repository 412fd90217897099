# ksm-guard's sharing scan (operations/sharing.py sends it with the command; perl-base only).
# Arguments: the page size, then the pids of the host's QEMU processes. Reads, never writes.
#
# The kernel's interface (Documentation/admin-guide/mm/pagemap.rst; fs/proc/task_mmu.c
# pte_to_pagemap_entry and fs/proc/page.c kpagecount_read/kpageflags_read, torvalds/linux):
# /proc/PID/pagemap holds one little-endian u64 per virtual page: bits 0-54 the PFN (zeroed
# without CAP_SYS_ADMIN), bit 56 "exclusively mapped" (set when the page's precise mapcount is 1),
# bit 63 present. /proc/kpageflags and /proc/kpagecount hold one u64 per PFN: the flags (bit 21
# KPF_KSM) and the number of page-table entries mapping the page (exact for small pages, which
# every KSM page is).
use strict;
use warnings;
no warnings 'portable';    # 64-bit addresses and PFNs

my ($page_size, @pids) = @ARGV;
my $CHUNK = 65536;      # pagemap entries per read (512 KiB: 256 MiB of guest RAM at 4 KiB)
my $GAP = 64;           # PFNs apart that one kpageflags/kpagecount read still spans
my $PFN_MASK = (1 << 55) - 1;
my ($user0, $system0) = times;

if ($> != 0) { print "error=needs root (euid $>): pagemap shows PFNs to CAP_SYS_ADMIN only\n"; exit 0 }
my ($flags_fh, $count_fh);
for (['/proc/kpageflags', \$flags_fh], ['/proc/kpagecount', \$count_fh]) {
    my ($path, $ref) = @$_;
    unless (open($$ref, '<:raw', $path)) { print "error=$path: $!\n"; exit 0 }
}

# One process: its private mappings' pagemap, in bulk. Returns (pages scanned, {PFN => number
# of its pages mapping it}) for the present pages that are not exclusively mapped (a page mapped
# once is shared with nobody), or an error.
sub scan {
    my ($pid) = @_;
    open(my $maps, '<', "/proc/$pid/maps") or return (undef, undef, "/proc/$pid/maps: $!");
    my @areas;
    while (my $line = <$maps>) {
        next unless $line =~ /^([0-9a-f]+)-([0-9a-f]+) \S\S\Sp /;
        push @areas, [hex($1) / $page_size, hex($2) / $page_size];
    }
    close $maps;
    open(my $pm, '<:raw', "/proc/$pid/pagemap") or return (undef, undef, "/proc/$pid/pagemap: $!");
    my ($scanned, %mine) = (0);
    for my $area (@areas) {
        my ($page, $end) = @$area;
        while ($page < $end) {
            my $want = $end - $page < $CHUNK ? $end - $page : $CHUNK;
            sysseek($pm, $page * 8, 0) or return (undef, undef, "/proc/$pid/pagemap: seek: $!");
            my $got = sysread($pm, my $buf, $want * 8);
            return (undef, undef, "/proc/$pid/pagemap: $!") unless defined $got;
            last if $got == 0;    # [vsyscall] and the like: nothing to read there
            for my $entry (unpack 'Q<*', $buf) {
                # present (bit 63) and not exclusively mapped (bit 56)
                $mine{$entry & $PFN_MASK}++ if (($entry >> 56) & 0x81) == 0x80;
            }
            $scanned += $got / 8;
            $page += $got / 8;
        }
    }
    close $pm;
    return ($scanned, \%mine, undef);
}

# u64s of a per-PFN file for the sorted PFNs, reading runs of nearby PFNs at once.
sub per_pfn {
    my ($fh, $pfns) = @_;
    my %value;
    my $i = 0;
    while ($i < @$pfns) {
        my $j = $i;
        $j++ while $j + 1 < @$pfns && $pfns->[$j + 1] - $pfns->[$j] <= $GAP;
        my ($first, $last) = ($pfns->[$i], $pfns->[$j]);
        sysseek($fh, $first * 8, 0) or last;
        my $got = sysread($fh, my $buf, ($last - $first + 1) * 8) or last;
        my @values = unpack 'Q<*', $buf;
        $value{$_} = $values[$_ - $first] for @$pfns[$i .. $j];
        $i = $j + 1;
    }
    return \%value;
}

# Every VM's candidate PFNs, with each VM's count of mappings: "index count" packed per PFN.
my (%mappers, @scanned, @ok);
for my $index (0 .. $#pids) {
    my ($pages, $mine, $error) = scan($pids[$index]);
    if (defined $error) { print "vm pid=$pids[$index] error=$error\n"; next }
    $scanned[$index] = $pages;
    $ok[$index] = 1;
    $mappers{$_} .= pack('NN', $index, $mine->{$_}) for keys %$mine;
}
my @candidates = sort { $a <=> $b } keys %mappers;
my $flags = per_pfn($flags_fh, \@candidates);
my @ksm = grep { defined $flags->{$_} && ($flags->{$_} >> 21) & 1 } @candidates;
my $counts = per_pfn($count_fh, \@ksm);

my (@distinct, @within, @other, %pair);
for my $pfn (@ksm) {
    my %by = unpack 'N*', $mappers{$pfn};
    my $mapped = 0;
    $mapped += $_ for values %by;
    my $others = ($counts->{$pfn} // 0) > $mapped;    # mapped by a process that is no VM
    my @vms = sort { $a <=> $b } keys %by;
    for my $vm (@vms) {
        $distinct[$vm]++;
        $other[$vm]++ if $others;
        $within[$vm]++ if @vms == 1 && !$others;
    }
    for my $x (0 .. $#vms) { $pair{"$vms[$x] $vms[$_]"}++ for $x + 1 .. $#vms }
}
for my $index (0 .. $#pids) {
    next unless $ok[$index];
    printf "vm pid=%s scanned=%d ksm=%d within=%d other=%d\n", $pids[$index], $scanned[$index],
        $distinct[$index] // 0, $within[$index] // 0, $other[$index] // 0;
}
for my $key (sort keys %pair) {
    my ($first, $second) = split ' ', $key;
    print "pair $pids[$first] $pids[$second] $pair{$key}\n";
}
my ($user, $system) = times;
my $peak = 0;    # this process's peak resident set (VmHWM), for the benchmark
if (open(my $status, '<', '/proc/self/status')) {
    while (<$status>) { $peak = $1 if /^VmHWM:\s*(\d+)/ }
}
printf "cpu user=%.3f system=%.3f candidates=%d peak_kib=%d\n", $user - $user0,
    $system - $system0, scalar @candidates, $peak;
