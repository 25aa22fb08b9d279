/* The same sieve as Tests/Peers/wasm/sieve.wat, natively: the count as 4 bytes on stdout. */
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

int main(void) {
    const uint32_t n = 10000000;
    uint8_t *marked = calloc(n, 1);
    uint32_t count = 0;
    for (uint32_t i = 2; i < n; i++) {
        if (marked[i]) continue;
        count++;
        for (uint32_t j = i + i; j < n; j += i) marked[j] = 1;
    }
    return write(1, &count, 4) == 4 ? 0 : 1;
}
