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

typedef struct { uint64_t lane[4]; uint64_t total; } digest_state;

static void digest_init(digest_state *d) {
    d->lane[0] = 0x243F6A8885A308D3ull; d->lane[1] = 0x13198A2E03707344ull;
    d->lane[2] = 0xA4093822299F31D0ull; d->lane[3] = 0x082EFA98EC4E6C89ull;
    d->total = 0;
}

// `n` bytes; every call but the last must pass a multiple of 32.
static void digest_update(digest_state *d, const uint8_t *p, size_t n) {
    d->total += n;
    size_t words = n / 8, i = 0;
    for (; i + 4 <= words; i += 4) {
        uint64_t w[4];
        memcpy(w, p + i * 8, 32);
        d->lane[0] = mix(d->lane[0], w[0]); d->lane[1] = mix(d->lane[1], w[1]);
        d->lane[2] = mix(d->lane[2], w[2]); d->lane[3] = mix(d->lane[3], w[3]);
    }
    for (; i < words; i++) {
        uint64_t w;
        memcpy(&w, p + i * 8, 8);
        d->lane[i & 3] = mix(d->lane[i & 3], w);
    }
    size_t rest = n % 8;
    if (rest) {
        uint64_t w = 0;
        memcpy(&w, p + words * 8, rest);
        d->lane[0] = mix(d->lane[0], w ^ ((uint64_t)rest << 56));
    }
}

static void digest_final(const digest_state *d, uint64_t out[2]) {
    out[0] = fmix(d->lane[0] ^ mix(d->lane[2], d->total));
    out[1] = fmix(d->lane[1] ^ mix(d->lane[3], ~d->total));
}

int ks_digest_fd(int fd, uint64_t out[2], uint64_t *size_out) {
    enum { CHUNK = 1 << 20 };
    uint8_t *buf = malloc(CHUNK);
    if (!buf) return -ENOMEM;
    digest_state d;
    digest_init(&d);
    off_t at = 0;
    for (;;) {
        // Whole chunks (a multiple of 32) until the end: the same digest as one buffer.
        size_t have = 0;
        while (have < CHUNK) {
            ssize_t n = pread(fd, buf + have, CHUNK - have, at);
            if (n < 0) { if (errno == EINTR) continue; int e = -errno; free(buf); return e; }
            if (n == 0) break;
            have += (size_t)n;
            at += n;
        }
        if (have == 0) break;
        digest_update(&d, buf, have);
        if (have < CHUNK) break;
    }
    free(buf);
    digest_final(&d, out);
    if (size_out) *size_out = d.total;
    return 0;
}

void ks_digest_bytes(const void *bytes, size_t len, uint64_t out[2]) {
    digest_state d;
    digest_init(&d);
    digest_update(&d, bytes, len);
    digest_final(&d, out);
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
