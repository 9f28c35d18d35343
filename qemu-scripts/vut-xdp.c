/*
 * vut-xdp: the XDP-drop guest of qemu-scripts/xdp-bench.sh (built by build-guest.sh, static,
 * runs inside the test guest as `vut-xdp IFNAME SECONDS INTERVAL_MS`).
 *
 * It loads an XDP program that counts every frame (and its bytes) in a one-entry BPF array map
 * and returns XDP_DROP, attaches it to IFNAME in native (driver) mode, and reports the count on
 * the console:
 *
 *   VUT-XDP-READY mode=native|generic prog_id=N     attached; counting starts at 0
 *   VUT-XDP <seconds> <frames> <pps>                 every INTERVAL_MS: time since attach,
 *                                                    frames so far, rate over the last interval
 *   VUT-XDP-RESULT seconds=S frames=N bytes=B        at the end (after SECONDS; 0 = never)
 *   VUT-XDP-WARN <msg> / VUT-ERROR <msg>
 *
 * Why hand-written BPF: the guest image is built with gcc only (no clang, no libbpf), and the
 * program is 16 instructions. Why XDP: the frame is dropped in the driver's receive path before
 * an skb exists, so the guest costs almost nothing per frame and the host side is what a
 * benchmark measures (the seed's method).
 *
 * Native mode needs a driver that accepts XDP: Linux virtio_net refuses it while guest offloads
 * (GUEST_TSO4/TSO6/ECN/UFO/CSUM) are negotiated, so the VM must be started with those off
 * (run-vm.sh --xdp). If native mode is refused, the program says why (the kernel's extack
 * message) and falls back to generic (skb) mode, reporting mode=generic: counts stay right, but
 * the guest then pays for an skb per frame.
 */
#include <errno.h>
#include <linux/bpf.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* One write() per line so lines from concurrent writers on the console stay whole. */
static void say(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    (void)!write(1, line, n);
}

static long sys_bpf(int cmd, union bpf_attr *attr) {
    return syscall(__NR_bpf, cmd, attr, sizeof *attr);
}

/* The map's value: both fields are updated with atomic adds, so every vCPU counts into the same
 * entry without a per-CPU map. */
struct counts {
    uint64_t frames;
    uint64_t bytes;
};

/* Instruction builders, named after the kernel's filter.h macros they mirror. */
#define INSN(c, d, s, o, i) \
    ((struct bpf_insn){.code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i)})
#define MOV64_REG(d, s) INSN(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)
#define MOV64_IMM(d, i) INSN(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, i)
#define ADD64_IMM(d, i) INSN(BPF_ALU64 | BPF_ADD | BPF_K, d, 0, 0, i)
#define SUB64_REG(d, s) INSN(BPF_ALU64 | BPF_SUB | BPF_X, d, s, 0, 0)
#define LDX_W(d, s, o) INSN(BPF_LDX | BPF_MEM | BPF_W, d, s, o, 0)
#define ST_W(d, o, i) INSN(BPF_ST | BPF_MEM | BPF_W, d, 0, o, i)
#define ATOMIC_ADD_DW(d, s, o) INSN(BPF_STX | BPF_ATOMIC | BPF_DW, d, s, o, BPF_ADD)
#define JEQ_IMM(d, i, o) INSN(BPF_JMP | BPF_JEQ | BPF_K, d, 0, o, i)
#define CALL(f) INSN(BPF_JMP | BPF_CALL, 0, 0, 0, f)
#define EXIT() INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)
/* 64-bit immediate load of a map fd (two instruction slots); the verifier turns the fd into the
 * map's address. */
#define LD_MAP_FD(d, fd) \
    INSN(BPF_LD | BPF_DW | BPF_IMM, d, BPF_PSEUDO_MAP_FD, 0, fd), INSN(0, 0, 0, 0, 0)

static int create_map(void) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_ARRAY;
    attr.key_size = sizeof(uint32_t);
    attr.value_size = sizeof(struct counts);
    attr.max_entries = 1;
    strncpy(attr.map_name, "vut_xdp_counts", sizeof attr.map_name - 1);
    return (int)sys_bpf(BPF_MAP_CREATE, &attr);
}

static char verifier_log[65536];

static int load_prog(int map_fd) {
    struct bpf_insn prog[] = {
        /* r6 = ctx (r1 is clobbered by the helper call) */
        MOV64_REG(BPF_REG_6, BPF_REG_1),
        /* r7 = data_end - data: the frame length (pointer subtraction: allowed for a
         * privileged loader, which we are) */
        LDX_W(BPF_REG_7, BPF_REG_6, offsetof(struct xdp_md, data_end)),
        LDX_W(BPF_REG_8, BPF_REG_6, offsetof(struct xdp_md, data)),
        SUB64_REG(BPF_REG_7, BPF_REG_8),
        /* key = 0 on the stack; r2 = &key */
        ST_W(BPF_REG_10, -4, 0),
        MOV64_REG(BPF_REG_2, BPF_REG_10),
        ADD64_IMM(BPF_REG_2, -4),
        /* r0 = bpf_map_lookup_elem(map, &key) */
        LD_MAP_FD(BPF_REG_1, map_fd),
        CALL(BPF_FUNC_map_lookup_elem),
        /* an array lookup of key 0 cannot fail, but the verifier insists on the check */
        JEQ_IMM(BPF_REG_0, 0, 3),
        MOV64_IMM(BPF_REG_1, 1),
        ATOMIC_ADD_DW(BPF_REG_0, BPF_REG_1, offsetof(struct counts, frames)),
        ATOMIC_ADD_DW(BPF_REG_0, BPF_REG_7, offsetof(struct counts, bytes)),
        /* return XDP_DROP */
        MOV64_IMM(BPF_REG_0, XDP_DROP),
        EXIT(),
    };
    static const char license[] = "GPL";
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_XDP;
    attr.insns = (uint64_t)(uintptr_t)prog;
    attr.insn_cnt = sizeof prog / sizeof prog[0];
    attr.license = (uint64_t)(uintptr_t)license;
    attr.log_buf = (uint64_t)(uintptr_t)verifier_log;
    attr.log_size = sizeof verifier_log;
    attr.log_level = 1;
    strncpy(attr.prog_name, "vut_xdp_drop", sizeof attr.prog_name - 1);
    int fd = (int)sys_bpf(BPF_PROG_LOAD, &attr);
    if (fd < 0 && errno == ENOSPC) {
        /* The log did not fit; retry without it so a verifier-clean program still loads. */
        attr.log_buf = 0;
        attr.log_size = 0;
        attr.log_level = 0;
        fd = (int)sys_bpf(BPF_PROG_LOAD, &attr);
    }
    return fd;
}

static uint32_t prog_id(int prog_fd) {
    struct bpf_prog_info info;
    union bpf_attr attr;
    memset(&info, 0, sizeof info);
    memset(&attr, 0, sizeof attr);
    attr.info.bpf_fd = prog_fd;
    attr.info.info_len = sizeof info;
    attr.info.info = (uint64_t)(uintptr_t)&info;
    return sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr) == 0 ? info.id : 0;
}

static void rta_put(char **p, unsigned short type, const void *data, unsigned short len) {
    struct rtattr *rta = (struct rtattr *)*p;
    rta->rta_type = type;
    rta->rta_len = RTA_LENGTH(len);
    if (len) memcpy(RTA_DATA(rta), data, len);
    *p += RTA_ALIGN(rta->rta_len);
}

/*
 * Attach (prog_fd >= 0) or detach (-1) with RTM_SETLINK + IFLA_XDP, the interface `ip link set
 * dev X xdp` uses. Chosen over BPF_LINK_CREATE because netlink returns the driver's reason for a
 * refusal (extended ack), which is the one thing a user needs when virtio_net says no.
 * Returns 0 or -errno; on failure `why` holds the kernel's message, if any.
 */
static int xdp_set(int ifindex, int prog_fd, uint32_t flags, char *why, size_t why_len) {
    why[0] = 0;
    int sock = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (sock < 0) return -errno;
    int one = 1;
    (void)setsockopt(sock, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof one);
    (void)setsockopt(sock, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);

    union {
        struct nlmsghdr nh;
        char buf[256];
    } req;
    memset(&req, 0, sizeof req);
    req.nh.nlmsg_type = RTM_SETLINK;
    req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    req.nh.nlmsg_seq = 1;
    struct ifinfomsg *ifi = NLMSG_DATA(&req.nh);
    ifi->ifi_family = AF_UNSPEC;
    ifi->ifi_index = ifindex;
    char *p = (char *)ifi + NLMSG_ALIGN(sizeof *ifi);
    struct rtattr *nest = (struct rtattr *)p;
    rta_put(&p, IFLA_XDP | NLA_F_NESTED, NULL, 0);
    int32_t fd = prog_fd;
    rta_put(&p, IFLA_XDP_FD, &fd, sizeof fd);
    rta_put(&p, IFLA_XDP_FLAGS, &flags, sizeof flags);
    nest->rta_len = (unsigned short)(p - (char *)nest);
    req.nh.nlmsg_len = (uint32_t)(p - req.buf);

    int ret = 0;
    if (send(sock, &req, req.nh.nlmsg_len, 0) < 0) {
        ret = -errno;
        goto out;
    }
    char resp[4096];
    ssize_t n = recv(sock, resp, sizeof resp, 0);
    if (n < 0) {
        ret = -errno;
        goto out;
    }
    struct nlmsghdr *nh = (struct nlmsghdr *)resp;
    if (!NLMSG_OK(nh, (unsigned)n) || nh->nlmsg_type != NLMSG_ERROR) {
        ret = -EPROTO;
        goto out;
    }
    struct nlmsgerr *err = NLMSG_DATA(nh);
    ret = err->error;
    if (ret != 0 && (nh->nlmsg_flags & NLM_F_ACK_TLVS)) {
        /* With NETLINK_CAP_ACK the request is not echoed: the TLVs follow struct nlmsgerr. */
        char *a = (char *)err + sizeof *err;
        char *end = (char *)nh + nh->nlmsg_len;
        while (a + sizeof(struct nlattr) <= end) {
            struct nlattr *nla = (struct nlattr *)a;
            if (nla->nla_len < sizeof *nla || a + nla->nla_len > end) break;
            if ((nla->nla_type & NLA_TYPE_MASK) == NLMSGERR_ATTR_MSG) {
                snprintf(why, why_len, "%.*s", (int)(nla->nla_len - sizeof *nla),
                         (char *)nla + sizeof *nla);
                break;
            }
            a += NLA_ALIGN(nla->nla_len);
        }
    }
out:
    close(sock);
    return ret;
}

static int read_counts(int map_fd, struct counts *c) {
    uint32_t key = 0;
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_fd = map_fd;
    attr.key = (uint64_t)(uintptr_t)&key;
    attr.value = (uint64_t)(uintptr_t)c;
    return (int)sys_bpf(BPF_MAP_LOOKUP_ELEM, &attr);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static volatile sig_atomic_t stop;
static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        say("VUT-ERROR usage: vut-xdp IFNAME SECONDS INTERVAL_MS");
        return 2;
    }
    const char *ifname = argv[1];
    long seconds = atol(argv[2]);
    long interval_ms = atol(argv[3]);
    unsigned ifindex = if_nametoindex(ifname);
    if (!ifindex || seconds < 0 || interval_ms <= 0) {
        say("VUT-ERROR vut-xdp: bad arguments (interface %s: %s)", ifname,
            ifindex ? "ok" : strerror(errno));
        return 2;
    }
    /* Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK (64 KiB by default). */
    struct rlimit unlimited = {RLIM_INFINITY, RLIM_INFINITY};
    (void)setrlimit(RLIMIT_MEMLOCK, &unlimited);

    int map_fd = create_map();
    if (map_fd < 0) {
        say("VUT-ERROR BPF_MAP_CREATE: %s", strerror(errno));
        return 1;
    }
    int prog_fd = load_prog(map_fd);
    if (prog_fd < 0) {
        int e = errno;
        /* The verifier's log explains a rejection; print its last lines. */
        size_t len = strlen(verifier_log);
        const char *tail = len > 400 ? verifier_log + len - 400 : verifier_log;
        for (char *nl; (nl = strchr(verifier_log, '\n'));) *nl = '|';
        say("VUT-ERROR BPF_PROG_LOAD: %s; verifier: %s", strerror(e), tail);
        return 1;
    }

    char why[256];
    const char *mode = "native";
    int r = xdp_set((int)ifindex, prog_fd, XDP_FLAGS_DRV_MODE, why, sizeof why);
    if (r != 0) {
        say("VUT-XDP-WARN native XDP refused on %s: %s%s%s; falling back to generic (skb) mode",
            ifname, strerror(-r), why[0] ? ": " : "", why);
        mode = "generic";
        r = xdp_set((int)ifindex, prog_fd, XDP_FLAGS_SKB_MODE, why, sizeof why);
        if (r != 0) {
            say("VUT-ERROR attaching XDP to %s: %s%s%s", ifname, strerror(-r), why[0] ? ": " : "",
                why);
            return 1;
        }
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    double start = now_s(), last_t = start;
    uint64_t last_frames = 0;
    struct counts c = {0, 0};
    say("VUT-XDP-READY mode=%s prog_id=%u", mode, prog_id(prog_fd));
    for (;;) {
        struct timespec pause = {interval_ms / 1000, (interval_ms % 1000) * 1000000L};
        nanosleep(&pause, NULL);
        if (read_counts(map_fd, &c) != 0) {
            say("VUT-ERROR BPF_MAP_LOOKUP_ELEM: %s", strerror(errno));
            return 1;
        }
        double t = now_s();
        double pps = t > last_t ? (double)(c.frames - last_frames) / (t - last_t) : 0;
        say("VUT-XDP %.1f %llu %.0f", t - start, (unsigned long long)c.frames, pps);
        last_t = t;
        last_frames = c.frames;
        if (stop || (seconds > 0 && t - start >= seconds)) break;
    }
    say("VUT-XDP-RESULT seconds=%.1f frames=%llu bytes=%llu mode=%s", last_t - start,
        (unsigned long long)c.frames, (unsigned long long)c.bytes, mode);
    /* Detach so that the NIC works normally again (e.g. with vut.shell=1). */
    (void)xdp_set((int)ifindex, -1, strcmp(mode, "native") == 0 ? XDP_FLAGS_DRV_MODE
                                                               : XDP_FLAGS_SKB_MODE,
                  why, sizeof why);
    return 0;
}
