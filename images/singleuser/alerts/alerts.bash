# shellcheck shell=bash
# Sourced by /etc/bash.bashrc, so by every interactive bash of a DS01 container
# (JupyterLab's terminals included): prints the ds01 service's alerts, such as
# retirement warnings, that this container has not shown yet. They come from
# ${DS01_WORKSPACE:-/workspace}/.ds01-alerts, one per line, newest last:
#
#     2026-12-02T15:04:05Z warning Your server "thesis" will be retired at ...
#     (UTC time, then warning, retired or info, then the message)
#
# The file sits in the researcher's workspace, so it is untrusted text: only a
# regular file is read (a FIFO or a directory never blocks), only its last
# 16 KiB, only well-formed lines of the last 24 hours, control characters
# removed (no terminal escapes). /tmp keeps, per container (hostname), the
# newest line shown: its time and how many lines had that time.
#
# Cost at a prompt: one stat; the file is read only when its size or mtime
# (or inode) changed since this shell last looked.

__ds01_alerts_show() {
    local file=${DS01_WORKSPACE:-/workspace}/.ds01-alerts
    [ -f "$file" ] || return 0
    local sig
    sig=$(command stat -L -c '%d:%i:%s:%.9Y' -- "$file" 2>/dev/null) || return 0
    [ "$sig" != "${__ds01_alerts_sig-}" ] || return 0
    __ds01_alerts_sig=$sig

    local state=${TMPDIR:-/tmp}/.ds01-alerts-shown.${HOSTNAME:-localhost}.${UID}
    local seen_time="" seen_count=0 since color=0 size=${sig#*:*:}
    size=${size%%:*}
    [ -f "$state" ] && read -r seen_time seen_count <"$state" 2>/dev/null
    case $seen_count in '' | *[!0-9]*) seen_count=0 ;; esac
    TZ=UTC0 printf -v since '%(%Y-%m-%dT%H:%M:%SZ)T' "$((${EPOCHSECONDS:-0} - 86400))"
    [ -t 1 ] && color=1
    # cut: the read starts inside the file, so its first line may be partial.
    command tail -c 16384 -- "$file" 2>/dev/null | LC_ALL=C command awk \
        -v seen_time="$seen_time" -v seen_count="$seen_count" -v since="$since" \
        -v cut="$((size > 16384))" -v color="$color" -v state="$state" -v file="$file" '
        cut && NR == 1 { next }
        /^[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z (warning|retired|info) / {
            t = substr($0, 1, 20)
            k = ++count[t]
            if (t > newest_time || (t == newest_time && k > newest_count)) {
                newest_time = t; newest_count = k
            }
            if (t < seen_time || (t == seen_time && k <= seen_count) || t < since) next
            rest = substr($0, 22)
            level = substr(rest, 1, index(rest, " ") - 1)
            msg = substr(rest, length(level) + 2)
            gsub(/[^ -~\200-\377]/, "", msg)            # C0 controls, DEL, NUL
            while (gsub(/\302[\200-\237]/, "", msg)) {}  # C1 controls (U+0080..U+009F)
            if (msg !~ /[^ ]/) next
            if (length(msg) > 2000) msg = substr(msg, 1, 2000) "..."
            shown[++n] = level SUBSEP msg
        }
        END {
            first = n > 5 ? n - 4 : 1
            if (first > 1) printf "ds01: %d earlier alerts: see %s\n", first - 1, file
            for (i = first; i <= n; i++) {
                split(shown[i], part, SUBSEP)
                on = ""
                if (color) on = part[1] == "warning" ? "\033[1;33m" : part[1] == "retired" ? "\033[1;31m" : "\033[1m"
                printf "%sds01: %s%s\n", on, part[2], (on != "" ? "\033[0m" : "")
            }
            if (newest_time > seen_time || (newest_time == seen_time && newest_count > seen_count))
                print newest_time, newest_count > state
        }' 2>/dev/null
    return 0
}

__ds01_alerts_prompt() {
    local status=$?
    __ds01_alerts_show
    return "$status"
}

case $- in
*i*)
    case ${PROMPT_COMMAND-} in
    *__ds01_alerts_prompt*) ;;
    *) PROMPT_COMMAND=${PROMPT_COMMAND:+$PROMPT_COMMAND$'\n'}__ds01_alerts_prompt ;;
    esac
    __ds01_alerts_show
    ;;
esac
