/* A clock read two calls below main: built with lld (gcc -fuse-ld=lld), whose text
   segment's address differs from its file offset, the stack must still name
   read_clock and main. */
#include <stdio.h>
#include <time.h>

__attribute__((noinline)) long read_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_nsec;
}

int main(void)
{
    long sum = 0;
    for (int i = 0; i < 3; i++)
        sum += read_clock();
    printf("%ld\n", sum & 1);
    return 0;
}
