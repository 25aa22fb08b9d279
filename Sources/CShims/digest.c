// A fast content digest for large local files (a VM template's memory image, the guest
// kernel and initramfs): four 64-bit multiply-xor lanes over 32-byte blocks, folded into
// 128 bits. It detects corruption and changed files; it is not a cryptographic hash (the
// files it covers live in directories only the daemon's user can write).
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <linux/random.h>
#include "CShims.h"

static inline uint64_t mix(uint64_t h, uint64_t w) {
    h ^= w * 0x9E3779B97F4A7C15ull;
    h = (h << 31) | (h >> 33);
    return h * 0xC2B2AE3D27D4EB4Full;
}

static inline uint64_t fmix(uint64_t h) {
    h ^= h >> 33; h *= 0xFF51AFD7ED558CCDull;
    h ^= h >> 33; h *= 0xC4CEB9FE1A85EC53ull;
    return h ^ (h >> 33);
}

int ks_digest_fd(int fd, uint64_t out[2], uint64_t *size_out) {
    enum { CHUNK = 1 << 20 };
    uint64_t *buf = malloc(CHUNK);
    if (!buf) return -ENOMEM;
    uint64_t lane[4] = {0x243F6A8885A308D3ull, 0x13198A2E03707344ull, 0xA4093822299F31D0ull, 0x082EFA98EC4E6C89ull};
    uint64_t total = 0;
    off_t at = 0;
    for (;;) {
        ssize_t n = pread(fd, buf, CHUNK, at);
        if (n < 0) { if (errno == EINTR) continue; int e = -errno; free(buf); return e; }
        if (n == 0) break;
        at += n;
        total += (uint64_t)n;
        size_t words = (size_t)n / 8;
        size_t i = 0;
        for (; i + 4 <= words; i += 4) {
            lane[0] = mix(lane[0], buf[i]); lane[1] = mix(lane[1], buf[i + 1]);
            lane[2] = mix(lane[2], buf[i + 2]); lane[3] = mix(lane[3], buf[i + 3]);
        }
        for (; i < words; i++) lane[i & 3] = mix(lane[i & 3], buf[i]);
        size_t rest = (size_t)n % 8;
        if (rest) {
            uint64_t w = 0;
            memcpy(&w, (uint8_t *)buf + words * 8, rest);
            lane[0] = mix(lane[0], w ^ ((uint64_t)rest << 56));
        }
    }
    free(buf);
    out[0] = fmix(lane[0] ^ mix(lane[2], total));
    out[1] = fmix(lane[1] ^ mix(lane[3], ~total));
    if (size_out) *size_out = total;
    return 0;
}

int ks_reseed_random(const void *seed, size_t len) {
    if (len > 512) return -EINVAL;
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct { int entropy_count; int buf_size; uint8_t buf[512]; } info;
    info.entropy_count = (int)(len * 8);
    info.buf_size = (int)len;
    memcpy(info.buf, seed, len);
    int e = 0;
    if (ioctl(fd, RNDADDENTROPY, &info) < 0) e = -errno;
    else if (ioctl(fd, RNDRESEEDCRNG) < 0) e = -errno;
    close(fd);
    return e;
}
