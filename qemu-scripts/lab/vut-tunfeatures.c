/* vut-tunfeatures: print the tun driver's TUNGETFEATURES bits (one line, hex) for the
 * backpressure lab, so the report says what the kernel offers independently of what the
 * daemon decided. IFF_BACKPRESSURE is 0x0080 (not in every linux/if_tun.h yet).
 *   VUT-LAB-TUN features=0x<hex> backpressure=yes|no
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define VUT_IFF_BACKPRESSURE 0x0080

int main(void) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        printf("VUT-LAB-ERROR open /dev/net/tun: %s\n", strerror(errno));
        return 1;
    }
    unsigned int features = 0;
    if (ioctl(fd, TUNGETFEATURES, &features) < 0) {
        printf("VUT-LAB-ERROR TUNGETFEATURES: %s\n", strerror(errno));
        return 1;
    }
    printf("VUT-LAB-TUN features=%#x backpressure=%s\n", features,
           (features & VUT_IFF_BACKPRESSURE) ? "yes" : "no");
    close(fd);
    return 0;
}
