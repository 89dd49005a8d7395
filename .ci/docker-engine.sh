#!/usr/bin/env bash
# Start or stop a private Docker engine for portway's docker-label tests.
#
#   .ci/docker-engine.sh start DIR   # engine at unix://DIR/docker.sock, image portway-busybox:latest
#   .ci/docker-engine.sh stop DIR
#
# Why these dockerd flags: the engine shares the machine with the developer's own (if any) and
# must not touch the host's firewall or bridges, so --iptables=false --bridge=none. Containers
# therefore get no default bridge network: tests run them with --network=host or --network=none.
# --storage-driver=vfs needs no overlay/kernel support (slow for big images, fine for busybox).
# No registry is reachable, so the one image is built locally from busybox-static.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$2
sock="$dir/docker.sock"
pidfile="$dir/docker.pid"
log="$dir/dockerd.log"
image=portway-busybox:latest
# Bounded wait: a healthy dockerd answers in 1-3 s here; 60 s covers a cold, loaded CI machine.
start_timeout=${PORTWAY_DOCKERD_START_TIMEOUT:-60}

ensure_packages() {
    # The image's only binary is /bin/busybox, so it must be the static build: the dynamic one
    # (package busybox) would need a libc inside the image.
    local missing=()
    command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 || missing+=(docker.io)
    dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "docker-engine: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        # docker.io's postinst would start a system dockerd (with iptables and docker0) where an
        # init system allows it; we want only our private one, so deny service starts meanwhile.
        local policy=/usr/sbin/policy-rc.d added_policy=""
        if [[ ! -e $policy ]]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
        fi
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || {
            [[ -z $added_policy ]] || rm -f "$policy"
            fail "could not install ${missing[*]}"
        }
        [[ -z $added_policy ]] || rm -f "$policy"
    fi
}

docker_cli() { docker -H "unix://$sock" "$@"; }

daemon_pid() {
    [[ -s $pidfile ]] || return 1
    local pid
    pid=$(cat "$pidfile")
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

fail() {
    echo "docker-engine: $*" >&2
    if [[ -f $log ]]; then
        echo "---- last lines of $log ----" >&2
        tail -n 40 "$log" >&2
    fi
    exit 1
}

build_image() {
    docker_cli image inspect "$image" >/dev/null 2>&1 && return 0
    local rootfs
    rootfs=$(mktemp -d "$dir/rootfs.XXXXXX")
    mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc" "$rootfs/www" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
    cp /bin/busybox "$rootfs/bin/busybox"
    # Every applet the static busybox has, so tests can use whatever they need.
    local applet
    for applet in $(/bin/busybox --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$rootfs/bin/$applet"
    done
    echo "root:x:0:0:root:/:/bin/sh" >"$rootfs/etc/passwd"
    echo "root:x:0:" >"$rootfs/etc/group"
    tar -C "$rootfs" -c . | docker_cli import --change 'CMD ["/bin/sh"]' - "$image" >/dev/null
    rm -rf "$rootfs"
}

start() {
    ensure_packages
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    sock="$dir/docker.sock"; pidfile="$dir/docker.pid"; log="$dir/dockerd.log"
    local launched=""
    if ! daemon_pid >/dev/null; then
        rm -f "$sock" "$pidfile"
        # setsid: the daemon must outlive this script and not get the caller's terminal signals.
        setsid dockerd \
            --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs \
            --data-root "$dir/root" --exec-root "$dir/exec" \
            -H "unix://$sock" --pidfile "$pidfile" \
            </dev/null >>"$log" 2>&1 &
        # Without job control setsid execs in place, so $! is dockerd itself: watching it
        # catches a daemon that dies before it writes its pidfile (bad flags, bad data-root).
        launched=$!
    fi
    local deadline=$((SECONDS + start_timeout))
    until docker_cli info >/dev/null 2>&1; do
        if (( SECONDS >= deadline )); then
            fail "dockerd did not answer on unix://$sock within ${start_timeout}s"
        fi
        if [[ -n $launched ]] && ! kill -0 "$launched" 2>/dev/null; then
            fail "dockerd exited during start"
        fi
        sleep 0.2
    done
    build_image || fail "could not import $image"
    echo "unix://$sock"
}

stop() {
    local pid
    if [[ -d $dir ]]; then
        dir=$(cd "$dir" && pwd)
        sock="$dir/docker.sock"; pidfile="$dir/docker.pid"; log="$dir/dockerd.log"
    fi
    if pid=$(daemon_pid); then
        # Remove containers first so their shims do not linger after the daemon is gone.
        docker_cli ps -aq 2>/dev/null | xargs -r docker -H "unix://$sock" rm -f >/dev/null 2>&1 || true
        kill "$pid"
        local i
        for i in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    # vfs layers are plain directories; exec-root may hold mounts (netns, shm) - unmount first.
    if [[ -d $dir ]]; then
        grep -F " $dir/" /proc/self/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
        rm -rf "$dir/root" "$dir/exec" "$sock" "$pidfile"
    fi
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
