/* Allocates (and touches) 1 MiB blocks until malloc fails or 512 MiB are held; prints
   how many MiB it got. Under a memory cap malloc fails cleanly: the process lives. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *blocks[512];

int main(void) {
    int mib = 0;
    while (mib < 512) {
        char *p = malloc(1 << 20);
        if (!p) break;
        memset(p, mib + 1, 1 << 20);
        blocks[mib++] = p;
    }
    long check = 0;
    for (int i = 0; i < mib; i++) check += blocks[i][i];
    printf("got %d MiB (%ld)\n", mib, check);
    return 0;
}
