#!/bin/bash
# Reads lines of a driver's text log (HOLDFAST_LOG=info,holdfast::exec=debug) on stdin and
# prints, in order, each command the driver ran (with the milliseconds since the log line
# before it: about the command's own time, as a command is logged when it ends) and each
# finished call (method and its time), then how many times each program ran. Used by the VM
# timing scripts to show where a ready-to-use volume's time goes.
awk '
  function secs(ts,   t, h, m, s) {  # 2026-12-02T07:20:01.123456Z -> seconds of the day
    t = substr(ts, index(ts, "T") + 1); sub(/Z$/, "", t)
    split(t, h, ":"); return h[1] * 3600 + h[2] * 60 + h[3]
  }
  {
    gsub(/\033\[[0-9;]*m/, "")
    now = secs($1); d = (NR > 1) ? (now - last) * 1000 : 0; last = now
  }
  / exec cmd=/ {
    c = substr($0, index($0, " exec cmd=") + 10); sub(/ code=.*/, "", c)
    printf "    %7.1f ms  %s\n", d, c
    split(c, w, " "); n[w[1]]++; total++
    next
  }
  /method="/ {
    m = $0; sub(/.*method="/, "", m); sub(/".*/, "", m)
    t = $0; sub(/.* ms=/, "", t); sub(/ .*/, "", t)
    printf "    %7.1f ms  == %s done (%s ms in the driver)\n", d, m, t
  }
  END {
    printf "    %d commands:", total
    for (p in n) printf " %s x%d", p, n[p]
    printf "\n"
  }'
