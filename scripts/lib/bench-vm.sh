# Shared by the VM benchmark scripts (bench-drill.sh, bench-live-wan.sh):
# timing helpers, a loopback S3 server (s3s-fs) with the test bed's fault
# proxy in front of it, test-bed-like libvirt domains and their local boot
# (the baseline). Sourced; the caller sets W (work dir), TIMEOUT (seconds a
# boot may take) and has built the binaries.

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
secs() { printf '%d.%06d' $(($1 / 1000000)) $(($1 % 1000000)); }
ratio() { printf '%.2f' "$(echo "scale=3; $1 / $2" | bc)"; }

# start_s3: s3s-fs on a free loopback port serving $W/s3 with bucket
# "bench"; sets S3PORT, DIRECT (its endpoint) and the AWS_* variables.
start_s3() {
    export AWS_ACCESS_KEY_ID=AKBENCHVM AWS_SECRET_ACCESS_KEY=benchvmsecret AWS_REGION=us-east-1
    export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
    S3PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    rm -rf "$W/s3"
    mkdir -p "$W/s3/bench"
    "$S3S_FS" --host 127.0.0.1 --port "$S3PORT" --access-key "$AWS_ACCESS_KEY_ID" \
        --secret-key "$AWS_SECRET_ACCESS_KEY" "$W/s3" >"$W/s3s.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$S3PORT") 2>/dev/null && break; sleep 0.05; done
    DIRECT=http://127.0.0.1:$S3PORT
}

# start_proxy DELAY_MS: the fault proxy in front of the S3 server, every
# request DELAY_MS late; sets PROXY to its endpoint.
start_proxy() {
    local out="$W/proxy-$1.out"
    "$PROXY_BIN" "$S3PORT" "$1" >"$out" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do [ -s "$out" ] && break; sleep 0.05; done
    PROXY=$(head -n 1 "$out")
}

# cpu_trace FILE PID...: until killed, every 0.1 s a line "EPOCH_US
# HOST_BUSY PIDS_BUSY": the host's busy CPU time (user, nice, system, irq,
# softirq, steal: everything but idle and iowait, all cores) and that of
# PIDS, in clock ticks. With cpu_between, how much of the host a run used
# and how much of it went to the peers of the test bed (the loopback S3
# server, the fault proxy), which a real bucket would not put on the host.
cpu_trace() {
    local out=$1 p peers _cpu user nice sys idle iowait irq softirq steal _rest f
    shift
    # Builtins only (no awk per sample): the trace must not load the host.
    while :; do
        read -r _cpu user nice sys idle iowait irq softirq steal _rest </proc/stat
        peers=0
        for p in "$@"; do
            read -r -a f 2>/dev/null <"/proc/$p/stat" || continue
            peers=$((peers + f[13] + f[14]))
        done
        echo "${EPOCHREALTIME/./} $((user + nice + sys + irq + softirq + steal)) $peers"
        sleep 0.1
    done >"$out"
}

# cpu_between FILE FROM_US TO_US: "BUSY PEERS AVAILABLE" in core-seconds
# between the samples of cpu_trace's FILE nearest FROM_US and TO_US
# (epoch microseconds); AVAILABLE is the span times the host's cores.
cpu_between() {
    awk -v a="$2" -v b="$3" -v hz="$(getconf CLK_TCK)" -v n="$(nproc)" '
        function near(t, x) { return (t - x < 0) ? x - t : t - x }
        { if (!fa || near($1, a) < near(fa, a)) { fa = $1; ba = $2; pa = $3 }
          if (!fb || near($1, b) < near(fb, b)) { fb = $1; bb = $2; pb = $3 } }
        END { printf "%.1f %.1f %.1f\n", (bb - ba) / hz, (pb - pa) / hz, (fb - fa) / 1e6 * n }' "$1"
}

PIDS=()
DOMAINS=()
cleanup() {
    local d
    for d in "${DOMAINS[@]}"; do
        virsh destroy "$d" >/dev/null 2>&1 || true
        virsh undefine "$d" --checkpoints-metadata >/dev/null 2>&1 ||
            virsh undefine "$d" >/dev/null 2>&1 || true
    done
    [ ${#PIDS[@]} -eq 0 ] || kill "${PIDS[@]}" 2>/dev/null || true
    rm -f "$W"/*.qcow2
}

# define_domain NAME DISK MEMORY_MIB [RAW_DISK]: a stopped domain like the
# test bed's (TCG, 1 vCPU, virtio disk, serial console to a file, no NIC)
# with a guest agent channel; RAW_DISK, if given, is its second disk (vdb).
define_domain() {
    local name=$1 disk=$2 mem=$3 second=""
    [ -n "${4:-}" ] && second="<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='$4'/><target dev='vdb' bus='virtio'/></disk>"

    cat >"$W/$name.xml" <<XML
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>$mem</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    $second
    <serial type='file'><source path='$W/$name.console.log'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>
XML
    DOMAINS+=("$name")
    virsh define "$W/$name.xml" >/dev/null
}

# local_boot NAME IMAGE DISK REGEX AGENT(0|1): a fresh copy of IMAGE as
# DISK, `virsh start` until a console line matches REGEX (and the guest agent
# answers); prints the two times in seconds from the start ("-" when not
# asked), then stops the domain.
local_boot() {
    local name=$1 image=$2 disk=$3 re=$4 agent=$5 log="$W/$1.console.log"
    local t0 el c="" a=- probe=0
    [ "$agent" = 1 ] && a=""
    cp --sparse=always "$image" "$disk"
    # On disk before the clock starts: the guest's first flush would
    # otherwise write the whole fresh copy back, stalling the boot by
    # tens of seconds (the drill's overlay starts empty).
    sync "$disk"
    rm -f "$log"
    # Polled as the drill polls (console every 250 ms, agent every second),
    # with few forks: the guest's vCPU shares the machine with this loop.
    t0=${EPOCHREALTIME/./}
    virsh start "$name" >/dev/null
    while [ -z "$c" ] || [ -z "$a" ]; do
        el=$((${EPOCHREALTIME/./} - t0))
        if [ -z "$c" ] && grep -Eq "$re" "$log" 2>/dev/null; then c=$(secs "$el"); fi
        if [ -z "$a" ] && [ "$el" -ge "$probe" ]; then
            probe=$((el + 1000000))
            if virsh qemu-agent-command "$name" --timeout 1 \
                '{"execute":"guest-ping"}' >/dev/null 2>&1; then
                a=$(secs $((${EPOCHREALTIME/./} - t0)))
            fi
        fi
        if [ "$el" -ge $((TIMEOUT * 1000000)) ]; then
            echo "local boot of $name: no match for '$re' (agent: ${a:-none}) in $TIMEOUT s" >&2
            tail -n 5 "$log" >&2 || true
            exit 1
        fi
        sleep 0.25
    done
    virsh destroy "$name" >/dev/null
    echo "$c $a"
}

