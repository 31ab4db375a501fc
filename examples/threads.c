/* threads: eight threads hammering the clocks, some created after the tracer attached.
 *
 *   gcc -O1 -pthread -o build/threads examples/threads.c
 *   vdsotrace trace -c --stack -- build/threads        # who calls what, and from where
 *   build/threads & vdsotrace console -p $!             # watch it live
 */
#include <pthread.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static void *reader(void *arg)
{
    long id = (long)arg;
    struct timespec ts;
    struct timeval tv;
    for (int i = 0; i < 2000; i++) {
        if (id % 2)
            clock_gettime(CLOCK_MONOTONIC, &ts);
        else
            gettimeofday(&tv, NULL);
        if (i % 100 == 0)
            usleep(1000);
    }
    return NULL;
}

int main(void)
{
    pthread_t t[8];
    for (long i = 0; i < 8; i++) {
        pthread_create(&t[i], NULL, reader, (void *)i);
        usleep(20000);
    }
    for (int i = 0; i < 8; i++)
        pthread_join(t[i], NULL);
    printf("threads: done\n");
    return 0;
}
