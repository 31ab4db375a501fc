// C++ callers with mangled names (_ZN4demo5Clock4readEi, ...): the trace names them
// demo::Clock::read(int) unless --no-demangle.
#include <cstdio>
#include <ctime>

namespace demo {
struct Clock {
    __attribute__((noinline)) long read(int id);
};

long Clock::read(int id)
{
    timespec ts;
    clock_gettime(id, &ts);
    return ts.tv_nsec;
}

template <typename T> __attribute__((noinline)) long sample(T &clock)
{
    return clock.read(CLOCK_MONOTONIC);
}
}  // namespace demo

int main()
{
    demo::Clock c;
    long sum = 0;
    for (int i = 0; i < 3; i++)
        sum += demo::sample(c);
    std::printf("%ld\n", sum & 1);
    return 0;
}
