/* Files through libc in the container's filesystem (the rootfs preopened as "/"):
   prints /etc/message, writes /written.txt, and lists the directory named by argv[1]
   (an OCI bind mount, its own preopen). Exit 10 + errno's class when a step fails. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    char line[256];
    FILE *in = fopen("/etc/message", "r");
    if (!in) { printf("open /etc/message: %s\n", strerror(errno)); return 10; }
    while (fgets(line, sizeof line, in)) fputs(line, stdout);
    fclose(in);
    FILE *out = fopen("/written.txt", "w");
    if (!out) { printf("create /written.txt: %s\n", strerror(errno)); return 11; }
    fputs("written by C through WASI\n", out);
    fclose(out);
    if (argc > 1) {
        DIR *d = opendir(argv[1]);
        if (!d) { printf("opendir %s: %s\n", argv[1], strerror(errno)); return 12; }
        struct dirent *e;
        while ((e = readdir(d))) if (e->d_name[0] != '.') printf("entry %s\n", e->d_name);
        closedir(d);
    }
    return 0;
}
