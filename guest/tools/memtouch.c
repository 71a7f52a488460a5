/*
 * memtouch: fill N MiB of fresh anonymous memory with an address-dependent pattern, read
 * it back, and report. Used by the real-guest tests to prove that hotplugged memory is
 * real, usable RAM (and, for the balloon, to make the guest use and free memory).
 *
 *   memtouch MIB [HOLD_SECONDS]
 *
 * Exit status 0 when every word read back what was written, 1 otherwise.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: memtouch MIB [HOLD_SECONDS]\n");
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 10);
    unsigned hold = argc > 2 ? strtoul(argv[2], NULL, 10) : 0;
    size_t len = mib << 20;
    double start = now();
    uint64_t *words = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (words == MAP_FAILED) {
        perror("memtouch: mmap");
        return 1;
    }
    size_t count = len / sizeof(uint64_t);
    uint64_t seed = 0x9e3779b97f4a7c15ULL ^ (uint64_t)getpid();
    for (size_t i = 0; i < count; i++)
        words[i] = (i * 0x100000001b3ULL) ^ seed;
    size_t bad = 0;
    for (size_t i = 0; i < count; i++)
        if (words[i] != ((i * 0x100000001b3ULL) ^ seed))
            bad++;
    printf("memtouch: %zu MiB written and read back, %zu bad words, %.2f s\n", mib, bad,
           now() - start);
    fflush(stdout);
    if (hold)
        sleep(hold);
    munmap(words, len);
    return bad ? 1 : 0;
}
