/* N distinct call sites of clock_gettime: a JIT'd page of N `mov $1,%edi; mov %r12,%rsi;
   call *%rbx` sequences (10 bytes each), called once. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
int main(int argc, char **argv){ long n = argc > 1 ? atol(argv[1]) : 400000;
 size_t len = 32 + 10 * n + 16; unsigned char *p = mmap(0, len, PROT_READ|PROT_WRITE|PROT_EXEC, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
 if (p == MAP_FAILED) return 1; unsigned char *c = p;
 /* push rbx; push r12; push rax (align); mov rbx,rdi; mov r12,rsi */
 memcpy(c, "\x53\x41\x54\x50\x48\x89\xfb\x49\x89\xf4", 10); c += 10;
 for (long i = 0; i < n; i++) { memcpy(c, "\xbf\x01\x00\x00\x00\x4c\x89\xe6\xff\xd3", 10); c += 10; }
 /* pop rax; pop r12; pop rbx; ret */
 memcpy(c, "\x58\x41\x5c\x5b\xc3", 5);
 struct timespec ts; void (*f)(void *, void *) = (void (*)(void *, void *))p;
 f((void *)clock_gettime, &ts); printf("%ld sites\n", n); return 0; }
