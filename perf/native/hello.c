/* A static hello, the native counterpart of Tests/Peers/wasm/hello.wat (exit 7). */
#include <unistd.h>

int main(void) {
    (void)!write(1, "hello from wasm\n", 16);
    return 7;
}
