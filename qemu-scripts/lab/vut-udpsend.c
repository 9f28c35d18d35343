/* vut-udpsend: the backpressure lab's traffic source (qemu-scripts/backpressure-lab.sh).
 *
 * Usage: vut-udpsend DST_IPV4 PORT THREADS SECONDS PAYLOAD_BYTES
 *
 * THREADS threads, each with its own blocking UDP socket connected to DST:PORT, send
 * PAYLOAD_BYTES datagrams back to back for SECONDS and count the send() calls that
 * succeeded. Blocking on purpose: that is how a local sender feels backpressure (its
 * socket's send buffer fills while its skbs wait in the qdisc). A send() that returns
 * is not a delivery: a qdisc or the tun ring may still drop the datagram, and UDP
 * reports neither (no IP_RECVERR). The lab counts those drops elsewhere.
 *
 * SO_SNDTIMEO (5 s) turns a stalled queue (a lost wake-up in the kernel or the daemon)
 * into a counted timeout instead of a hung lab. 5 s, not less: under TCG on a busy host
 * the whole VM can stand still for a second or two, which is not a stall. Output, one line each, on stdout:
 *   VUT-LAB-SEND-THREAD i=<n> sent=<n> errors=<n> timeouts=<n> sndbuf=<bytes> first_error=<errno>
 *   VUT-LAB-SEND threads=<n> sent=<n> errors=<n> timeouts=<n> elapsed_ms=<n>
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct worker {
    pthread_t thread;
    int index;
    unsigned long long sent, errors, timeouts;
    int sndbuf, first_error;
};

static struct sockaddr_in dst;
static size_t payload;
static double seconds;
static pthread_barrier_t start_line;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    printf("VUT-LAB-ERROR vut-udpsend: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void *run(void *arg) {
    struct worker *w = arg;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    struct timeval tv = {.tv_sec = 5};
    if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0) die("SO_SNDTIMEO");
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) die("connect");
    socklen_t len = sizeof w->sndbuf;
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &w->sndbuf, &len) < 0) die("SO_SNDBUF");
    char *buf = calloc(1, payload ? payload : 1);
    if (!buf) die("calloc");

    pthread_barrier_wait(&start_line);
    double deadline = now_s() + seconds;
    /* The clock is read after every send: a vDSO call is cheap next to sendmsg, and a
     * sender throttled to a few thousand datagrams per second must still stop on time. */
    while (now_s() < deadline) {
        if (send(fd, buf, payload, 0) == (ssize_t)payload) {
            w->sent++;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            w->timeouts++;
        } else {
            if (!w->errors) w->first_error = errno;
            w->errors++;
        }
    }
    close(fd);
    free(buf);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        printf("VUT-LAB-ERROR usage: vut-udpsend DST_IPV4 PORT THREADS SECONDS PAYLOAD_BYTES\n");
        return 2;
    }
    dst.sin_family = AF_INET;
    dst.sin_port = htons((unsigned short)atoi(argv[2]));
    int threads = atoi(argv[3]);
    seconds = atof(argv[4]);
    payload = (size_t)atol(argv[5]);
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1 || threads < 1 || threads > 64 ||
        seconds <= 0 || payload > 1472) {
        printf("VUT-LAB-ERROR vut-udpsend: bad arguments\n");
        return 2;
    }
    struct worker *w = calloc(threads, sizeof *w);
    if (!w) die("calloc");
    /* The main thread joins the barrier too, so the clock starts when every socket is ready. */
    pthread_barrier_init(&start_line, NULL, threads + 1);
    for (int i = 0; i < threads; i++) {
        w[i].index = i;
        errno = pthread_create(&w[i].thread, NULL, run, &w[i]);
        if (errno) die("pthread_create");
    }
    pthread_barrier_wait(&start_line);
    double t0 = now_s();
    unsigned long long sent = 0, errors = 0, timeouts = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(w[i].thread, NULL);
        printf("VUT-LAB-SEND-THREAD i=%d sent=%llu errors=%llu timeouts=%llu sndbuf=%d "
               "first_error=%d\n",
               i, w[i].sent, w[i].errors, w[i].timeouts, w[i].sndbuf, w[i].first_error);
        sent += w[i].sent;
        errors += w[i].errors;
        timeouts += w[i].timeouts;
    }
    printf("VUT-LAB-SEND threads=%d sent=%llu errors=%llu timeouts=%llu elapsed_ms=%lld\n", threads,
           sent, errors, timeouts, (long long)((now_s() - t0) * 1000));
    return 0;
}
