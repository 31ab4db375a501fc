/* A tracee whose names attack the terminal. The test renames the exported function
   HOSTILE_NAME_PLACEHOLDER_0123456789abcdef in the binary to bytes that set the terminal's
   title, clear the screen and forge a trace line (ESC, BEL, a newline, invalid UTF-8),
   and runs it from a directory whose name does the same.

   hostile RECORD MAP1 MAP2 [N] [nowait]: maps MAP1 (read + exec) and names itself (comm)
   with the same kind of bytes before its ready line,
   waits for one byte on stdin (unless "nowait"), maps MAP2 (mid-trace), calls time() once
   from a new anonymous page (a caller in no known mapping: the tracer reads the maps again,
   MAP2 in them), calls the hostile function N times (each reads CLOCK_MONOTONIC) and
   writes {"calls": N} to RECORD. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline, used, visibility("default")))
long HOSTILE_NAME_PLACEHOLDER_0123456789abcdef(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_nsec;
}

static void map_file(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0 || mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0) == MAP_FAILED) {
        perror(path);
        exit(2);
    }
    close(fd);
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: hostile RECORD MAP1 MAP2 [N] [nowait]\n");
        return 2;
    }
    int n = argc > 4 ? atoi(argv[4]) : 3;
    int wait = !(argc > 5 && strcmp(argv[5], "nowait") == 0);
    map_file(argv[2]);
    /* a comm (15 bytes at most) that sets the title and starts a new line */
    prctl(PR_SET_NAME, "\033]0;t\007\n\377comm", 0, 0, 0);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    if (wait) {
        char c;
        if (read(0, &c, 1) != 1)
            return 3;
    }
    map_file(argv[3]);
    /* push %rbx; mov %rdi,%rbx; xor %edi,%edi; call *%rbx; pop %rbx; ret: time(NULL) from
       here (glibc resolves time straight to the vDSO) */
    unsigned char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED)
        return 5;
    memcpy(page, "\x53\x48\x89\xfb\x31\xff\xff\xd3\x5b\xc3", 10);
    long (*call_time)(time_t (*)(time_t *)) = (long (*)(time_t (*)(time_t *)))page;
    long s = call_time(time) & 0;
    for (int i = 0; i < n; i++)
        s += HOSTILE_NAME_PLACEHOLDER_0123456789abcdef();
    FILE *f = fopen(argv[1], "w");
    if (!f)
        return 4;
    fprintf(f, "{\"calls\": %d, \"sum_parity\": %ld}\n", n, s & 1);
    fclose(f);
    return 0;
}
