/*
 * vut-blast: the host-side sender of qemu-scripts/xdp-bench.sh. Sends minimum-size Ethernet
 * frames out of one interface for a fixed time, from N threads, and reports exactly how many
 * frames it handed to the kernel.
 *
 *   vut-blast IFNAME DST_MAC THREADS SECONDS
 *
 * Output (stdout, one line): sent=N accepted=N enobufs=N seconds=S threads=T frame_bytes=60
 *
 * Frames: 60 bytes (64 on a wire with the FCS, the "64-byte frame" of packet benchmarks):
 * Ethernet to DST_MAC from the interface's own MAC, IPv4 198.18.0.1 -> 198.18.0.2 (RFC 2544's
 * benchmarking range; nothing on the host routes it), UDP to the discard port. They leave through
 * an AF_PACKET socket bound to IFNAME, so no address, route or neighbour entry is involved, and
 * they pass the interface's qdisc (no PACKET_QDISC_BYPASS): exactly the path of the seed's
 * measurement. Each thread has its own socket and uses sendmmsg() in batches.
 *
 * Accounting: `sent` counts every frame the kernel took responsibility for, i.e. the frames it
 * accepted plus the ones its qdisc refused at enqueue (sendmmsg then stops early, or fails with
 * ENOBUFS: the qdisc counted those as drops). So sent = qdisc drops + what the qdisc passed on,
 * and the caller can balance sent against the receiver and every drop counter. Any other error
 * ends the run with status 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FRAME_LEN 60
#define BATCH 64
#define MAX_THREADS 64

struct worker {
    pthread_t thread;
    int index;
    unsigned char frame[FRAME_LEN];
    uint64_t accepted, enobufs;
    int error; /* errno of a fatal send error, 0 if none */
};

static int ifindex;
static double start, deadline;
static pthread_barrier_t start_line;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint16_t ip_checksum(const void *data, size_t len) {
    const uint16_t *w = data;
    uint32_t sum = 0;
    for (; len > 1; len -= 2) sum += *w++;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void build_frame(unsigned char *f, const unsigned char *dst, const unsigned char *src,
                        int flow) {
    memset(f, 0, FRAME_LEN);
    struct ether_header *eth = (struct ether_header *)f;
    memcpy(eth->ether_dhost, dst, 6);
    memcpy(eth->ether_shost, src, 6);
    eth->ether_type = htons(ETHERTYPE_IP);
    struct iphdr *ip = (struct iphdr *)(f + sizeof *eth);
    ip->version = 4;
    ip->ihl = 5;
    ip->ttl = 64;
    ip->protocol = IPPROTO_UDP;
    ip->tot_len = htons(FRAME_LEN - sizeof *eth);
    ip->saddr = htonl(0xc6120001); /* 198.18.0.1 */
    ip->daddr = htonl(0xc6120002); /* 198.18.0.2 */
    ip->check = ip_checksum(ip, sizeof *ip);
    struct udphdr *udp = (struct udphdr *)(ip + 1);
    udp->source = htons((uint16_t)(10000 + flow)); /* one flow per thread */
    udp->dest = htons(9);                          /* discard */
    udp->len = htons(FRAME_LEN - sizeof *eth - sizeof *ip);
    /* udp->check = 0: no checksum, allowed for IPv4 */
}

static void *run(void *arg) {
    struct worker *w = arg;
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0); /* protocol 0: receive nothing */
    if (fd < 0) {
        w->error = errno;
        pthread_barrier_wait(&start_line);
        return NULL;
    }
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = ifindex, .sll_halen = 6};
    memcpy(to.sll_addr, w->frame, 6);
    struct iovec iov = {.iov_base = w->frame, .iov_len = FRAME_LEN};
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_name = &to;
        msgs[i].msg_hdr.msg_namelen = sizeof to;
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    pthread_barrier_wait(&start_line);
    struct timespec at = {(time_t)start, (long)((start - (time_t)start) * 1e9)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL) == EINTR) {
    }
    while (now_s() < deadline) {
        int n = sendmmsg(fd, msgs, BATCH, 0);
        if (n == BATCH) {
            w->accepted += BATCH;
        } else if (n >= 0) {
            /* Stopped early: message n failed and its error is not reported. With a qdisc and
             * the device up the only way is a refused enqueue (NET_XMIT_DROP), which the qdisc
             * counted as a drop: count it as sent-and-dropped, do not resend it. */
            w->accepted += (uint64_t)n;
            w->enobufs++;
        } else if (errno == ENOBUFS) {
            w->enobufs++;
        } else if (errno != EINTR) {
            w->error = errno;
            break;
        }
    }
    close(fd);
    return NULL;
}

static int parse_mac(const char *s, unsigned char *mac) {
    unsigned b[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5]) != 6) return -1;
    for (int i = 0; i < 6; i++) {
        if (b[i] > 255) return -1;
        mac[i] = (unsigned char)b[i];
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: vut-blast IFNAME DST_MAC THREADS SECONDS\n");
        return 2;
    }
    unsigned char dst[6], src[6];
    int threads = atoi(argv[3]);
    double seconds = atof(argv[4]);
    ifindex = (int)if_nametoindex(argv[1]);
    if (!ifindex || parse_mac(argv[2], dst) || threads < 1 || threads > MAX_THREADS ||
        seconds <= 0) {
        fprintf(stderr, "vut-blast: bad arguments (interface %s %s)\n", argv[1],
                ifindex ? "found" : "not found");
        return 2;
    }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", argv[1]);
    if (s < 0 || ioctl(s, SIOCGIFHWADDR, &ifr) < 0) {
        perror("vut-blast: SIOCGIFHWADDR");
        return 1;
    }
    memcpy(src, ifr.ifr_hwaddr.sa_data, 6);
    close(s);

    static struct worker workers[MAX_THREADS];
    pthread_barrier_init(&start_line, NULL, (unsigned)threads + 1);
    for (int i = 0; i < threads; i++) {
        workers[i].index = i;
        build_frame(workers[i].frame, dst, src, i);
    }
    /* Start and deadline are set before the threads exist; each sets up its socket, then sleeps
     * until the start time, so all send over the same interval. */
    start = now_s() + 0.1;
    deadline = start + seconds;
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&workers[i].thread, NULL, run, &workers[i]) != 0) {
            perror("vut-blast: pthread_create");
            return 1;
        }
    }
    pthread_barrier_wait(&start_line);
    uint64_t accepted = 0, enobufs = 0;
    int error = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(workers[i].thread, NULL);
        accepted += workers[i].accepted;
        enobufs += workers[i].enobufs;
        if (workers[i].error) error = workers[i].error;
    }
    double elapsed = now_s() - start;
    printf("sent=%llu accepted=%llu enobufs=%llu seconds=%.3f threads=%d frame_bytes=%d\n",
           (unsigned long long)(accepted + enobufs), (unsigned long long)accepted,
           (unsigned long long)enobufs, elapsed, threads, FRAME_LEN);
    if (error) {
        fprintf(stderr, "vut-blast: send failed: %s\n", strerror(error));
        return 1;
    }
    return 0;
}
