/* Reads stdin to EOF; prints the byte count and a rolling checksum of every byte. */
#include <stdio.h>
#include <unistd.h>

static unsigned char buf[65536];  /* not on the stack: wasm-ld gives it 64 KiB */

int main(void) {
    unsigned long long n = 0, sum = 0;
    ssize_t r;
    while ((r = read(0, buf, sizeof buf)) > 0) {
        for (ssize_t i = 0; i < r; i++) sum = sum * 31 + buf[i];
        n += (unsigned long long)r;
    }
    printf("%llu bytes, sum %llu\n", n, sum);
    return r < 0 ? 1 : 0;
}
