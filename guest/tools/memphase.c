/*
 * memphase: take and give back anonymous memory in phases, for the memory autopilot's
 * tests and demo. Every page it allocates is written (an address-dependent word per page)
 * and checked again when it is released.
 *
 *   memphase PHASE...
 *
 *   ramp:MIB:SECS   grow what is held to MIB, evenly over SECS seconds (never down)
 *   burst:MIB:SECS  take MIB more, evenly over SECS seconds (1 s or less: at once)
 *   hold:SECS       keep what is held, writing every held page once a second
 *   idle:SECS       keep what is held without touching it
 *   release         give everything back (munmap)
 *
 * e.g. memphase ramp:3072:30 hold:20 release idle:30 burst:1024:2 hold:10 release
 *
 * Output: one line per second, "memphase t=<s> held=<MiB> ok", then
 * "memphase verify bad_pages=<n>" after each release that found pages not holding what was
 * written, and at the end "memphase done failed_allocs=<n>". An allocation that fails (mmap,
 * or populating the pages) is counted and retried on the next 100 ms step; it does not stop
 * the program. The guest kernel's OOM killer can still choose this process: that is the
 * guest's verdict, and it shows in the balloon's oom_kills statistic.
 *
 * Exit status: 0, 1 when a released page did not hold what was written, 2 on bad arguments.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define CHUNK (1UL << 20)
#define PAGE 4096UL
#define STEP_NS 100000000L
#define MAX_PHASES 256

enum kind { RAMP, BURST, HOLD, IDLE, RELEASE };

struct phase {
    enum kind kind;
    unsigned long mib;
    unsigned long secs;
};

static char **chunks;
static size_t nchunks, cap_chunks;
static unsigned long failed_allocs;
static unsigned long bad_pages_total;
static int populate_works = 1;

static uint64_t pattern(const void *page)
{
    return (uint64_t)(uintptr_t)page * 0x9e3779b97f4a7c15ULL ^ 0x6d656d7068617365ULL;
}

static void write_chunk(char *chunk)
{
    for (size_t off = 0; off < CHUNK; off += PAGE)
        *(volatile uint64_t *)(chunk + off) = pattern(chunk + off);
}

/* Takes one more chunk; returns 0 on success, -1 (counted) on failure. */
static int take_chunk(void)
{
    if (nchunks == cap_chunks) {
        size_t cap = cap_chunks ? cap_chunks * 2 : 1024;
        char **grown = realloc(chunks, cap * sizeof(*chunks));
        if (!grown) {
            failed_allocs++;
            return -1;
        }
        chunks = grown;
        cap_chunks = cap;
    }
    char *chunk = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (chunk == MAP_FAILED) {
        failed_allocs++;
        return -1;
    }
    /* Populating first turns a shortage into ENOMEM here instead of a fault while writing. */
    if (populate_works && madvise(chunk, CHUNK, MADV_POPULATE_WRITE) != 0) {
        if (errno == EINVAL) {
            populate_works = 0; /* a kernel before 5.14 */
        } else {
            munmap(chunk, CHUNK);
            failed_allocs++;
            return -1;
        }
    }
    write_chunk(chunk);
    chunks[nchunks++] = chunk;
    return 0;
}

static void release_all(void)
{
    unsigned long bad = 0;
    for (size_t i = 0; i < nchunks; i++) {
        for (size_t off = 0; off < CHUNK; off += PAGE)
            if (*(volatile uint64_t *)(chunks[i] + off) != pattern(chunks[i] + off))
                bad++;
        munmap(chunks[i], CHUNK);
    }
    nchunks = 0;
    if (bad) {
        printf("memphase verify bad_pages=%lu\n", bad);
        fflush(stdout);
    }
    bad_pages_total += bad;
}

static int parse_ulong(const char *text, unsigned long *out)
{
    char *end;
    if (!*text || *text == '-')
        return -1;
    errno = 0;
    unsigned long v = strtoul(text, &end, 10);
    if (errno || *end)
        return -1;
    *out = v;
    return 0;
}

/* Parses "name", "name:A" or "name:A:B" into a phase. */
static int parse_phase(const char *arg, struct phase *p)
{
    char buf[128];
    if (strlen(arg) >= sizeof(buf))
        return -1;
    strcpy(buf, arg);
    char *fields[4] = {0};
    int n = 0;
    for (char *s = strtok(buf, ":"); s && n < 4; s = strtok(NULL, ":"))
        fields[n++] = s;
    if (n == 0)
        return -1;
    memset(p, 0, sizeof(*p));
    if (!strcmp(fields[0], "release") && n == 1) {
        p->kind = RELEASE;
        return 0;
    }
    if ((!strcmp(fields[0], "hold") || !strcmp(fields[0], "idle")) && n == 2) {
        p->kind = fields[0][0] == 'h' ? HOLD : IDLE;
        return parse_ulong(fields[1], &p->secs);
    }
    if ((!strcmp(fields[0], "ramp") || !strcmp(fields[0], "burst")) && n == 3) {
        p->kind = fields[0][0] == 'r' ? RAMP : BURST;
        if (parse_ulong(fields[1], &p->mib) || parse_ulong(fields[2], &p->secs))
            return -1;
        /* Sizes beyond what a 64-bit address space maps are typing errors. */
        return p->mib > (1UL << 30) || p->secs > 86400 ? -1 : 0;
    }
    return -1;
}

static struct timespec start, next_step;
static unsigned long next_report;

static double since_start(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9;
}

/* Sleeps to the next 100 ms step and prints the per-second line when one is due. */
static void step(void)
{
    next_step.tv_nsec += STEP_NS;
    if (next_step.tv_nsec >= 1000000000L) {
        next_step.tv_nsec -= 1000000000L;
        next_step.tv_sec++;
    }
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next_step, NULL) == EINTR) {
    }
    double t = since_start();
    while ((double)next_report <= t) {
        printf("memphase t=%lu held=%zu ok\n", next_report, nchunks * (CHUNK >> 20));
        fflush(stdout);
        next_report++;
    }
}

/* Grows what is held from `from` toward `to` MiB over `secs` seconds of 100 ms steps. */
static void grow(size_t from, size_t to, unsigned long secs)
{
    unsigned long steps = secs ? secs * 10 : 1;
    for (unsigned long i = 1; i <= steps; i++) {
        size_t want = from + (to > from ? (to - from) * i / steps : 0);
        while (nchunks < want)
            if (take_chunk() != 0)
                break; /* counted; the next step tries again */
        step();
    }
}

int main(int argc, char **argv)
{
    struct phase phases[MAX_PHASES];
    int count = argc - 1;
    if (count < 1 || count > MAX_PHASES) {
        fprintf(stderr, "usage: memphase PHASE... (ramp:MIB:SECS burst:MIB:SECS hold:SECS "
                        "idle:SECS release), at most %d phases\n",
                MAX_PHASES);
        return 2;
    }
    for (int i = 0; i < count; i++) {
        if (parse_phase(argv[i + 1], &phases[i]) != 0) {
            fprintf(stderr, "memphase: bad phase '%s'\n", argv[i + 1]);
            return 2;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &start);
    next_step = start;
    for (int i = 0; i < count; i++) {
        struct phase *p = &phases[i];
        switch (p->kind) {
        case RAMP:
            grow(nchunks, p->mib, p->secs);
            break;
        case BURST:
            grow(nchunks, nchunks + p->mib, p->secs);
            break;
        case HOLD:
            for (unsigned long s = 0; s < p->secs * 10; s++) {
                /* A tenth of the held chunks per step: every page once a second. */
                for (size_t c = s % 10; c < nchunks; c += 10)
                    write_chunk(chunks[c]);
                step();
            }
            break;
        case IDLE:
            for (unsigned long s = 0; s < p->secs * 10; s++)
                step();
            break;
        case RELEASE:
            release_all();
            break;
        }
    }
    release_all();
    printf("memphase done failed_allocs=%lu\n", failed_allocs);
    fflush(stdout);
    free(chunks);
    return bad_pages_total ? 1 : 0;
}
