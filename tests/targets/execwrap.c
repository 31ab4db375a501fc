/* execwrap: a wrapper that execs another program, as env, nice or a shell's `exec` do.
 *
 *   execwrap [--seccomp] PROG [ARGS...]
 *
 * Not a recording target: it makes no vDSO call of its own and execs PROG with ARGS
 * (through PATH when PROG has no slash). --seccomp first installs a seccomp filter that
 * allows everything (with no_new_privs), which stays across the exec: the new image then
 * runs under seccomp, where --inject refuses to make system calls in it.
 * Exits 127 when the exec fails.
 */
#define _GNU_SOURCE
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int i = 1;
    if (i < argc && strcmp(argv[i], "--seccomp") == 0) {
        struct sock_filter f[] = { BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW) };
        struct sock_fprog prog = { 1, f };
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
            perror("execwrap: seccomp");
            return 127;
        }
        i++;
    }
    if (i >= argc) {
        fprintf(stderr, "usage: execwrap [--seccomp] PROG [ARGS...]\n");
        return 127;
    }
    execvp(argv[i], argv + i);
    perror("execwrap: exec");
    return 127;
}
