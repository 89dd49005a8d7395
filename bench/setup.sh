#!/bin/sh
# Installs what bench/run.py drives: the Debian peers (HAProxy, nginx stream, socat), the
# backends (iperf3, nginx HTTP, dnsmasq) and the load generators (iperf3, wrk, dnsperf).
# Idempotent; needs root (or sudo) for apt-get. Skips apt entirely when everything is present.
set -e
need=""
for tool in haproxy nginx socat iperf3 wrk dnsperf dnsmasq taskset; do
    command -v "$tool" >/dev/null 2>&1 || need="yes"
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need="yes"
if [ -n "$need" ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        haproxy nginx-light libnginx-mod-stream socat iperf3 wrk dnsperf dnsmasq util-linux >/dev/null
fi
# Debian starts the packaged daemons on install; the bench runs its own copies on its own ports.
for svc in haproxy nginx dnsmasq; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        echo "note: system $svc is running; the bench does not need it" >&2
    fi
done
exit 0
