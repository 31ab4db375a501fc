/* N short-lived children, one after another, each reading CLOCK_MONOTONIC once: traced
   with -f -c, the tracer must let each child's state go when it exits. */
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv){ int n = argc > 1 ? atoi(argv[1]) : 20000;
 for (int i = 0; i < n; i++) { pid_t p = fork(); if (p == 0) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); _exit(0); } if (p < 0) return 1; waitpid(p, 0, 0); }
 return 0; }
