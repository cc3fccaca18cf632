# vm-tests/lib/host.sh: host-side helpers shared by build-image.sh and run.sh (sourced, not run).
# Owns: logging, the cache location, apt downloads, installing qemu, and waiting with deadlines.

VMT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VMT_ROOT=$(cd "$VMT_DIR/.." && pwd)
VMT_CACHE=${VMTESTS_CACHE:-$VMT_DIR/.cache}

vmt_log() { printf 'vm-tests: %s\n' "$*" >&2; }
vmt_die() {
    printf 'vm-tests: error: %s\n' "$*" >&2
    exit 2
}

# Runs apt-get quietly; the sandbox user is root so downloads into the cache dir work.
vmt_apt() {
    DEBIAN_FRONTEND=noninteractive apt-get -q -o APT::Sandbox::User=root "$@"
}

# Refreshes the apt lists once per process (a fresh machine may have none, or stale ones).
VMT_APT_UPDATED=0
vmt_apt_update() {
    if [[ $VMT_APT_UPDATED == 0 ]]; then
        vmt_log "apt-get update"
        vmt_apt update >/dev/null || vmt_die "apt-get update failed"
        VMT_APT_UPDATED=1
    fi
}

# Prints the candidate version of a package ("" when apt knows none).
vmt_candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { if ($2 != "(none)") print $2 }'
}

# Prints the candidate version, refreshing the apt lists once when apt knows none.
vmt_candidate_or_update() {
    local v
    v=$(vmt_candidate "$1")
    if [[ -z $v ]]; then
        vmt_apt_update
        v=$(vmt_candidate "$1")
    fi
    [[ -n $v ]] || vmt_die "apt knows no package $1"
    printf '%s\n' "$v"
}

# Installs qemu-system-x86 when qemu-system-x86_64 is missing. It never removes packages: the
# machines carry qemu-utils from bookworm-backports, whose Breaks: qemu-system-common (<< 8.0)
# makes a plain install of bookworm's qemu-system-x86 remove it. In that case qemu-system-x86 is
# installed from bookworm-backports too (--no-remove: never at qemu-utils' cost), through a private apt
# sources list, so the machine's sources stay untouched.
vmt_ensure_qemu() {
    command -v qemu-system-x86_64 >/dev/null && return 0
    [[ $(id -u) == 0 ]] || vmt_die "qemu-system-x86_64 is missing and installing it needs root"
    vmt_log "installing qemu-system-x86"
    vmt_apt_update
    if vmt_apt install -s --no-install-recommends qemu-system-x86 2>/dev/null | grep -q '^Remv '; then
        local utils_version
        utils_version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
        vmt_log "a plain install would remove qemu-utils $utils_version: using backports"
        local codename archive b=$VMT_CACHE/apt-backports
        codename=$(. /etc/os-release && printf '%s' "$VERSION_CODENAME")
        # The machine's own mirror for the release, taken from apt (no host is written here).
        archive=$(apt-cache policy 2>/dev/null |
            awk -v s="$codename/main" '$2 ~ /^[a-z]+:\/\// && $3 == s { print $2; exit }')
        [[ -n $codename && -n $archive ]] || vmt_die "cannot find the apt mirror of ${codename:-this release}"
        mkdir -p "$b/lists/partial" "$b/archives/partial"
        printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s-backports main\n' \
            "$archive" "$codename" >"$b/backports.list"
        # The machine's sources (sources.list.d) plus backports, with private lists.
        local o=(-o "Dir::Etc::sourcelist=$b/backports.list"
            -o "Dir::State::lists=$b/lists" -o "Dir::Cache::archives=$b/archives")
        vmt_apt "${o[@]}" update >/dev/null || vmt_die "apt-get update (backports) failed"
        vmt_apt "${o[@]}" install -y --no-install-recommends --no-remove -t "$codename-backports" \
            qemu-system-x86 >"$b/install.log" 2>&1 ||
            vmt_die "installing qemu-system-x86 from backports failed: see $b/install.log"
        rm -rf "$b/lists" "$b/archives"
    else
        vmt_apt install -y --no-install-recommends --no-remove qemu-system-x86 >/dev/null ||
            vmt_die "apt-get install qemu-system-x86 failed"
    fi
    command -v qemu-system-x86_64 >/dev/null || vmt_die "qemu-system-x86_64 still missing after install"
}

# vmt_wait_for_line FILE REGEX SECONDS [PID]: waits until a line of FILE matches REGEX (prints
# it); fails after SECONDS or as soon as PID (when given) has exited without the line appearing.
vmt_wait_for_line() {
    local file=$1 regex=$2 seconds=$3 pid=${4:-}
    local deadline=$((SECONDS + seconds)) line
    while ((SECONDS < deadline)); do
        if [[ -f $file ]] && line=$(grep -a -m1 -E -- "$regex" "$file"); then
            printf '%s\n' "$line"
            return 0
        fi
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            # One last look: the line may have been written just before the exit.
            if [[ -f $file ]] && line=$(grep -a -m1 -E -- "$regex" "$file"); then
                printf '%s\n' "$line"
                return 0
            fi
            return 1
        fi
        sleep 0.2
    done
    return 1
}

# vmt_stop PID SECONDS: SIGTERM, then SIGKILL after SECONDS; returns the exit status (or 137).
vmt_stop() {
    local pid=$1 seconds=$2 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < seconds * 5; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        vmt_log "pid $pid ignored SIGTERM for ${seconds}s: killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}
