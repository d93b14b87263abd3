# Sourced by tests/vm/*-suite.sh: run the test binaries and the driver from the guest's RAM,
# not from the 9p share.
#
# Why: under TCG every exec of a binary on the share reads its pages over 9p again (the
# share is mounted cache=mmap, so nothing stays cached between processes): measured on the
# CI machine, `holdfast --version` took 2.0-3.5 s from the share and 0.5-0.9 s from the
# guest's tmpfs, and a conformance run starts the driver about 50 times. A local copy also
# keeps running drivers safe from a host-side rebuild of target/debug/holdfast, which
# otherwise changes the pages under them (SIGSEGV).
#
#   on the host:  vm_bins_strip BIN...   writes a copy of each BIN without debug information
#                                        to BIN.vm (a tenth of the size to copy into RAM;
#                                        panics still name their file and line)
#   in the guest: vm_bins_local BIN...   copies each BIN.vm (or BIN when there is no .vm) into
#                                        /tmp/hf-bins and bind-mounts the copy over BIN, so
#                                        the paths compiled into the test binaries
#                                        (CARGO_BIN_EXE_holdfast) lead to the copy

vm_bins_strip() {
  local b
  for b in "$@"; do
    # A temporary of this process's own, renamed into place: scripts/test runs two suites at
    # once on the same binaries, and a guest may be copying BIN.vm meanwhile.
    objcopy --strip-debug "$b" "$b.vm.$$.tmp" && mv -f "$b.vm.$$.tmp" "$b.vm" || {
      rm -f "$b.vm.$$.tmp" "$b.vm"
      echo "vm_bins_strip: cannot strip $b: the guest will copy it whole" >&2
    }
  done
}

vm_bins_local() {
  local b src copy n=0
  mkdir -p /tmp/hf-bins
  for b in "$@"; do
    n=$((n + 1))
    src=$b
    [ -e "$b.vm" ] && src=$b.vm
    copy=/tmp/hf-bins/$n-$(basename "$b")
    cp "$src" "$copy"
    chmod 0755 "$copy"
    mount --bind "$copy" "$b"
  done
  echo "   binaries run from the guest's RAM: $* ($(du -sh /tmp/hf-bins | cut -f1))"
}
