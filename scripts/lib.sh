# shellcheck shell=bash
# Helpers shared by scripts/bootstrap and images/build (sourced, not run), so
# the engine start-up logic lives in one place.

# Run as root when we are not (apt and dockerd need it).
ds01_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Install Debian packages that are missing; `apt-get update` at most once per
# run, and not at all when everything is already installed (keeps re-runs fast).
_DS01_APT_UPDATED=0
ds01_apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' \
            || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$_DS01_APT_UPDATED" -eq 0 ]; then
        ds01_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        _DS01_APT_UPDATED=1
    fi
    echo "apt: installing ${missing[*]}"
    ds01_as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq "${missing[@]}" >/dev/null
}

# exec "$@" with no descriptor open but 0, 1 and 2 (run it in a subshell): a
# daemon started under a lock must not keep that lock after we exit.
ds01_exec_without_fds() {
    local fd
    for fd in $(ls "/proc/$BASHPID/fd"); do
        if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
    done
    exec "$@"
}

# Make sure a Docker engine answers. There is no systemd on these machines, so
# we start dockerd ourselves -- but never a second one: a lock serialises
# concurrent callers, and a dockerd that is already starting is waited for.
ds01_ensure_engine() {
    local log=/var/log/ds01-dockerd.log lock=/run/lock/ds01-dockerd.lock
    [ "$(id -u)" -eq 0 ] || log=${TMPDIR:-/tmp}/ds01-dockerd.log
    if docker info >/dev/null 2>&1; then
        echo "engine: running ($(docker version -f '{{.Server.Version}}'))"
        return 0
    fi
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        ds01_apt_install docker.io
    fi
    [ -d /run/lock ] || lock=/tmp/ds01-dockerd.lock
    (
        flock 9
        docker info >/dev/null 2>&1 && exit 0
        local pid="" started=""
        [ -r /var/run/docker.pid ] && pid=$(cat /var/run/docker.pid)
        if pgrep -x dockerd >/dev/null \
            || { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }; then
            echo "engine: dockerd already starting, waiting for it"
        else
            echo "engine: starting dockerd (log: $log)"
            # dockerd must not inherit (and so hold forever) a lock: ours (fd 9)
            # or a caller's (`flock /tmp/ds01-integration.lock scripts/bootstrap`).
            # setsid: it outlives this script and the CI step's process group.
            if [ "$(id -u)" -eq 0 ]; then
                (ds01_exec_without_fds setsid dockerd) </dev/null >"$log" 2>&1 &
            else
                # shellcheck disable=SC2024 # the log is ours, only dockerd needs root
                (ds01_exec_without_fds sudo setsid dockerd) </dev/null >"$log" 2>&1 &
            fi
            started=$!
        fi
        for _ in $(seq 60); do
            docker info >/dev/null 2>&1 && exit 0
            if [ -n "$started" ] && ! kill -0 "$started" 2>/dev/null; then
                break # the dockerd we started has died: no point waiting
            fi
            sleep 1
        done
        echo "engine: dockerd is not answering; docker info says:" >&2
        docker info 2>&1 | tail -n 3 >&2 || true
        echo "engine: last lines of $log:" >&2
        tail -n 20 "$log" >&2 || true
        exit 1
    ) 9>"$lock" || return 1
    echo "engine: running ($(docker version -f '{{.Server.Version}}'))"
}

# Run pip without the "Location 'file:///...' is ignored" warnings that some
# hosts' pip.conf (extra find-links that do not exist) add to every lookup.
ds01_pip() {
    "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
}

# sha256 (hex) of stdin.
ds01_sha256() {
    sha256sum | cut -d' ' -f1
}
