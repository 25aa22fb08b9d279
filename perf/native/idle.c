/* Blocks reading stdin until EOF: the native counterpart of Tests/Peers/wasm/cat.wat
   as an idle container (the memory benchmark keeps 100 of each waiting). */
#include <unistd.h>

int main(void) {
    char buf[4096];
    while (read(0, buf, sizeof buf) > 0) {}
    return 0;
}
