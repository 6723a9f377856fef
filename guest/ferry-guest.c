/*
 * Ferry's guest program: the oracle inside a real QEMU guest (see PROTOCOL.md beside this file).
 *
 * It runs a named workload on /dev/vda with O_DIRECT, keeps the version of every 4 KiB block in
 * its own memory (so the table migrates with the VM), checks every read against the content
 * function and reports over a serial line: a heartbeat every few ms from its own thread, violations,
 * and replies to commands. Built with `gcc -static -O2 -pthread` and run as /init's last step.
 *
 * Host mode: `ferry-guest --dump SEED BLOCK VERSION` writes that block's 4096 bytes to stdout (the
 * TypeScript content function is tested against it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/fs.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL_VERSION 1
#define BLOCK_BYTES 4096u
#define BLOCK_WORDS (BLOCK_BYTES / 4)
#define MAGIC 0x59524546u /* "FERY" in little-endian bytes */
#define SEED_SALT 0x46455259u
#define SEQ_RUN_BLOCKS 64u     /* seqwrite: 256 KiB per operation */
#define MIXED_WINDOW_BLOCKS 1024u
#define MIXED_DRIFT_OPS 8u
#define HOT_SET_BLOCKS 256u
#define VERIFY_CHUNK_BLOCKS 256u /* 1 MiB per read while verifying or rescanning */
#define MAX_SEED 9007199254740991ull /* 2^53 - 1: the TypeScript side works in doubles */
#define MAX_RATE 10000000u
#define REPORT_LINES_PER_SECOND 100
#define LINE_MAX_BYTES 256

#ifndef GUEST_VERSION
#define GUEST_VERSION "dev"
#endif

enum workload { W_IDLE, W_SEQWRITE, W_RANDWRITE, W_MIXED, W_READMOSTLY, W_MEMHOG, W_COUNT };
static const char *const WORKLOAD_NAMES[W_COUNT] = {"idle", "seqwrite", "randwrite", "mixed", "readmostly", "memhog"};
/* ops/s when neither ferry.rate= nor `rate` set one */
static const uint32_t DEFAULT_RATES[W_COUNT] = {0, 20, 200, 200, 200, 1000};

/* ------------------------------------------------------------------------------------------ */
/* The content function (the same in hypervisor/qemu/guest-content.ts)                        */
/* ------------------------------------------------------------------------------------------ */

static uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

static uint32_t mix_index(uint32_t key, uint64_t index) {
  uint32_t lo = (uint32_t)index, hi = (uint32_t)(index >> 32);
  return mix32(mix32(key ^ lo) ^ (hi * 0x9e3779b1u) ^ 0x5bd1e995u);
}

static uint32_t seed_key(uint64_t seed) { return mix_index(SEED_SALT, seed); }

/* Version 0 is all zeros; any other version is a header (magic, version, block, key) + xorshift128. */
static void block_content(uint32_t *out, uint32_t key, uint64_t block, uint32_t version) {
  if (version == 0) {
    memset(out, 0, BLOCK_BYTES);
    return;
  }
  uint32_t k = mix_index(key, block);
  uint32_t a = mix32(k ^ version) | 1;
  uint32_t b = mix32(a ^ 0x6a09e667u);
  uint32_t c = mix32(b ^ 0xbb67ae85u);
  uint32_t d = mix32(c ^ (version * 0x3c6ef372u));
  for (unsigned i = 0; i < BLOCK_WORDS; i++) {
    uint32_t t = a ^ (a << 11);
    a = b;
    b = c;
    c = d;
    d = d ^ (d >> 19) ^ (t ^ (t >> 8));
    out[i] = d;
  }
  out[0] = MAGIC;
  out[1] = version;
  out[2] = (uint32_t)block;
  out[3] = (uint32_t)(block >> 32);
  out[4] = key;
}

/* ------------------------------------------------------------------------------------------ */
/* State                                                                                       */
/* ------------------------------------------------------------------------------------------ */

struct counters {
  uint64_t ops, reads, writes, pages, violations, io_errors, io_max_us, slow_ios, slow_us;
  uint64_t inflight_since_ns; /* 0 = no disk I/O in flight */
  uint64_t heartbeat_seq;
};

static struct {
  uint64_t seed;
  uint32_t key;
  uint64_t blocks;
  uint32_t *table; /* the version of every block: guest memory, migrates with the VM */
  int disk, chan;
  bool fill, rescan;
  uint32_t heartbeat_ms, slow_ms, memhog_mib;
  const char *channel_path, *disk_path;
  struct counters c;
  int workload;
  uint32_t rate;
  bool rate_set;     /* a rate was given (cmdline or `rate`): kept across `workload` changes */
  uint64_t settings; /* bumped on every workload/rate change: the workload thread restarts its pacing */
  pthread_mutex_t disk_lock;
  pthread_mutex_t settings_lock;
  pthread_cond_t settings_changed;
  uint8_t *memhog;
  uint64_t memhog_pages;
  int report_second, report_count;
  uint64_t boot_ms;
} g = {
    .heartbeat_ms = 5,
    .slow_ms = 50,
    .memhog_mib = 16,
    .channel_path = "/dev/ttyS1",
    .disk_path = "/dev/vda",
    .workload = W_IDLE,
    .disk_lock = PTHREAD_MUTEX_INITIALIZER,
    .settings_lock = PTHREAD_MUTEX_INITIALIZER,
    .report_second = -1,
};

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define ADD(x, v) __atomic_add_fetch(&(x), (v), __ATOMIC_RELAXED)

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t uptime_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000ull + (uint64_t)ts.tv_nsec / 1000000ull;
}

/* ------------------------------------------------------------------------------------------ */
/* Output: one write() per line (the tty layer keeps a write of one short line whole)          */
/* ------------------------------------------------------------------------------------------ */

static void emit(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void emit(const char *fmt, ...) {
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (n > (int)sizeof line - 2) n = sizeof line - 2;
  line[n++] = '\n';
  if (g.chan >= 0) {
    for (int done = 0; done < n;) {
      ssize_t w = write(g.chan, line + done, (size_t)(n - done));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) break;
      done += (int)w;
    }
  }
}

/* Also on the console (ttyS0), for the console log and for a host that only reads that. */
static void console(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void console(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stdout, fmt, ap);
  va_end(ap);
  fputc('\n', stdout);
  fflush(stdout);
}

static void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fatal(const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  console("FERRY-FATAL %s", msg);
  emit("FERRY-FATAL %s", msg);
  sleep(1); /* let the lines drain; then PID 1 exits, the kernel panics and QEMU (-no-reboot) quits */
  exit(1);
}

/* At most REPORT_LINES_PER_SECOND violation/error lines a second; the counters stay exact. */
static bool may_report(void) {
  static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
  int second = (int)(now_ns() / 1000000000ull);
  pthread_mutex_lock(&lock);
  if (second != g.report_second) {
    g.report_second = second;
    g.report_count = 0;
  }
  bool ok = g.report_count++ < REPORT_LINES_PER_SECOND;
  pthread_mutex_unlock(&lock);
  return ok;
}

/* ------------------------------------------------------------------------------------------ */
/* Disk                                                                                        */
/* ------------------------------------------------------------------------------------------ */

static void note_latency(uint64_t started) {
  uint64_t us = (now_ns() - started) / 1000u;
  STORE(g.c.inflight_since_ns, 0);
  uint64_t max = LOAD(g.c.io_max_us);
  while (us > max && !__atomic_compare_exchange_n(&g.c.io_max_us, &max, us, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  if (us >= (uint64_t)g.slow_ms * 1000u) {
    ADD(g.c.slow_ios, 1);
    ADD(g.c.slow_us, us);
  }
}

/* Whole-length positional I/O, timed; false (with an `E` line) on an error. */
static bool disk_io(bool write_op, void *buf, size_t len, uint64_t block) {
  uint64_t started = now_ns();
  STORE(g.c.inflight_since_ns, started);
  off_t offset = (off_t)(block * BLOCK_BYTES);
  size_t done = 0;
  int err = 0;
  while (done < len) {
    ssize_t n = write_op ? pwrite(g.disk, (char *)buf + done, len - done, offset + (off_t)done)
                         : pread(g.disk, (char *)buf + done, len - done, offset + (off_t)done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      err = n < 0 ? errno : EIO;
      break;
    }
    done += (size_t)n;
  }
  note_latency(started);
  if (err == 0) return true;
  ADD(g.c.io_errors, 1);
  if (may_report()) emit("E io-error op=%s block=%" PRIu64 " bytes=%zu errno=%d %s", write_op ? "write" : "read", block, len, err, strerror(err));
  return false;
}

static bool all_zero(const uint32_t *w) {
  for (unsigned i = 0; i < BLOCK_WORDS; i++)
    if (w[i]) return false;
  return true;
}

/* What a block that did not match holds, as PROTOCOL.md's `found=` values. */
static void describe_found(const uint32_t *w, uint64_t block, char *out, size_t size) {
  if (all_zero(w)) {
    snprintf(out, size, "0");
    return;
  }
  if (w[0] != MAGIC) {
    snprintf(out, size, "garbage");
    return;
  }
  if (w[4] != g.key) {
    snprintf(out, size, "foreign");
    return;
  }
  uint64_t named = (uint64_t)w[2] | ((uint64_t)w[3] << 32);
  if (named != block) {
    snprintf(out, size, "misplaced:%" PRIu64 ":%" PRIu32, named, w[1]);
    return;
  }
  static __thread uint32_t expect[BLOCK_WORDS] __attribute__((aligned(64)));
  block_content(expect, g.key, block, w[1]);
  snprintf(out, size, memcmp(expect, w, BLOCK_BYTES) == 0 ? "%" PRIu32 : "torn:%" PRIu32, w[1]);
}

/* Checks one block read from the disk against the table; counts and reports a mismatch. */
static bool check_block(const uint32_t *got, uint64_t block, const char *source, uint32_t *scratch) {
  uint32_t expected = g.table[block];
  block_content(scratch, g.key, block, expected);
  if (memcmp(scratch, got, BLOCK_BYTES) == 0) return true;
  ADD(g.c.violations, 1);
  if (may_report()) {
    char found[64];
    describe_found(got, block, found, sizeof found);
    emit("V src=%s block=%" PRIu64 " expected=%" PRIu32 " found=%s", source, block, expected, found);
  }
  return false;
}

static void *aligned_alloc_or_die(size_t bytes) {
  void *p = NULL;
  if (posix_memalign(&p, BLOCK_BYTES, bytes) != 0) fatal("out of memory allocating %zu bytes: give the VM more memory", bytes);
  return p;
}

/* ------------------------------------------------------------------------------------------ */
/* Boot: parameters, disk, version table                                                       */
/* ------------------------------------------------------------------------------------------ */

static int workload_by_name(const char *name) {
  for (int w = 0; w < W_COUNT; w++)
    if (strcmp(name, WORKLOAD_NAMES[w]) == 0) return w;
  return -1;
}

static bool parse_u64(const char *s, uint64_t max, uint64_t *out) {
  if (!*s) return false;
  uint64_t v = 0;
  for (; *s; s++) {
    if (*s < '0' || *s > '9') return false;
    if (v > (max - (uint64_t)(*s - '0')) / 10) return false;
    v = v * 10 + (uint64_t)(*s - '0');
  }
  *out = v;
  return true;
}

static void param_u32(const char *name, const char *value, uint32_t min, uint32_t max, uint32_t *out) {
  uint64_t v;
  if (!parse_u64(value, max, &v) || v < min) fatal("ferry.%s=%s: use a whole number from %u to %u", name, value, min, max);
  *out = (uint32_t)v;
}

static void param_bool(const char *name, const char *value, bool *out) {
  if (strcmp(value, "0") && strcmp(value, "1")) fatal("ferry.%s=%s: use 0 or 1", name, value);
  *out = value[0] == '1';
}

static void parse_cmdline(void) {
  FILE *f = fopen("/proc/cmdline", "r");
  if (!f) fatal("cannot read /proc/cmdline: %s (is /proc mounted?)", strerror(errno));
  static char line[4096];
  if (!fgets(line, sizeof line, f)) line[0] = 0;
  fclose(f);
  bool seen_workload = false;
  for (char *save = NULL, *tok = strtok_r(line, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
    if (strncmp(tok, "ferry.", 6) != 0) continue;
    char *name = tok + 6, *value = strchr(name, '=');
    if (!value) fatal("ferry.%s has no value: write ferry.%s=VALUE", name, name);
    *value++ = 0;
    if (strcmp(name, "seed") == 0) {
      if (!parse_u64(value, MAX_SEED, &g.seed)) fatal("ferry.seed=%s: use a whole number from 0 to %llu", value, MAX_SEED);
    } else if (strcmp(name, "workload") == 0) {
      g.workload = workload_by_name(value);
      if (g.workload < 0) fatal("ferry.workload=%s: use idle, seqwrite, randwrite, mixed, readmostly or memhog", value);
      seen_workload = true;
    } else if (strcmp(name, "rate") == 0) {
      param_u32(name, value, 0, MAX_RATE, &g.rate);
      g.rate_set = true;
    } else if (strcmp(name, "fill") == 0) {
      param_bool(name, value, &g.fill);
    } else if (strcmp(name, "rescan") == 0) {
      param_bool(name, value, &g.rescan);
    } else if (strcmp(name, "heartbeat_ms") == 0) {
      param_u32(name, value, 1, 1000, &g.heartbeat_ms);
    } else if (strcmp(name, "slow_ms") == 0) {
      param_u32(name, value, 1, 600000, &g.slow_ms);
    } else if (strcmp(name, "memhog_mib") == 0) {
      param_u32(name, value, 1, 65536, &g.memhog_mib);
    } else {
      fatal("unknown parameter ferry.%s: see guest/PROTOCOL.md for the ferry.* parameters", name);
    }
  }
  if (!seen_workload) g.workload = W_IDLE;
  if (!g.rate_set) g.rate = DEFAULT_RATES[g.workload];
  g.key = seed_key(g.seed);
}

static void open_disk(void) {
  /* The virtio_blk module was loaded by /init just before: its device node may take a moment. */
  for (int tries = 0; (g.disk = open(g.disk_path, O_RDWR | O_DIRECT)) < 0; tries++) {
    if (tries >= 100) fatal("cannot open %s: %s (is there a virtio-blk disk, and did virtio_blk load? see the console log)", g.disk_path, strerror(errno));
    usleep(50000);
  }
  uint64_t bytes = 0;
  if (ioctl(g.disk, BLKGETSIZE64, &bytes) != 0) fatal("cannot get the size of %s: %s", g.disk_path, strerror(errno));
  g.blocks = bytes / BLOCK_BYTES;
  if (g.blocks == 0) fatal("%s has %" PRIu64 " bytes: the disk needs at least one 4 KiB block", g.disk_path, bytes);
  g.table = calloc(g.blocks, sizeof *g.table);
  if (!g.table) fatal("out of memory for the version table of %" PRIu64 " blocks (%" PRIu64 " bytes): give the VM more memory", g.blocks, g.blocks * 4);
}

static void open_channel(void) {
  g.chan = open(g.channel_path, O_RDWR | O_NOCTTY);
  if (g.chan < 0) fatal("cannot open the channel %s: %s (the VM needs a second isa-serial port)", g.channel_path, strerror(errno));
  struct termios t;
  if (tcgetattr(g.chan, &t) != 0) fatal("tcgetattr %s: %s", g.channel_path, strerror(errno));
  cfmakeraw(&t);
  cfsetispeed(&t, B115200);
  cfsetospeed(&t, B115200);
  t.c_cc[VMIN] = 1;
  t.c_cc[VTIME] = 0;
  if (tcsetattr(g.chan, TCSANOW, &t) != 0) fatal("tcsetattr %s: %s", g.channel_path, strerror(errno));
  tcflush(g.chan, TCIOFLUSH);
}

struct rescan_result {
  uint64_t nonzero, unknown, ms;
  uint32_t max_version;
};

/* Rebuilds the table from the block headers: after a reboot the disk is the truth. */
static struct rescan_result rescan_disk(void) {
  struct rescan_result r = {0, 0, 0, 0};
  uint64_t started = now_ns();
  uint32_t *buf = aligned_alloc_or_die(VERIFY_CHUNK_BLOCKS * BLOCK_BYTES);
  for (uint64_t first = 0; first < g.blocks; first += VERIFY_CHUNK_BLOCKS) {
    uint64_t count = g.blocks - first < VERIFY_CHUNK_BLOCKS ? g.blocks - first : VERIFY_CHUNK_BLOCKS;
    if (!disk_io(false, buf, count * BLOCK_BYTES, first)) fatal("rescan: cannot read blocks %" PRIu64 "..%" PRIu64 " of %s", first, first + count - 1, g.disk_path);
    for (uint64_t k = 0; k < count; k++) {
      const uint32_t *w = buf + k * BLOCK_WORDS;
      uint64_t block = first + k;
      if (w[0] == MAGIC && w[4] == g.key && ((uint64_t)w[2] | ((uint64_t)w[3] << 32)) == block && w[1] != 0) {
        g.table[block] = w[1];
        r.nonzero++;
        if (w[1] > r.max_version) r.max_version = w[1];
      } else if (!all_zero(w)) {
        r.unknown++; /* left at 0: a verify reports it */
      }
    }
  }
  free(buf);
  r.ms = (now_ns() - started) / 1000000u;
  return r;
}

/* ------------------------------------------------------------------------------------------ */
/* Heartbeat                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static void *heartbeat_main(void *arg) {
  (void)arg;
  struct sched_param sp = {.sched_priority = 10};
  int rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp); /* so a busy workload does not delay it */
  if (rc != 0) console("ferry-guest: the heartbeat runs at normal priority (SCHED_FIFO refused: %s)", strerror(rc));
  uint64_t period = (uint64_t)g.heartbeat_ms * 1000000u, next = now_ns();
  for (;;) {
    next += period;
    uint64_t now = now_ns();
    if (next < now) next = now + period; /* after a freeze: no burst of catch-up beats */
    struct timespec ts = {.tv_sec = (time_t)(next / 1000000000u), .tv_nsec = (long)(next % 1000000000u)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
    uint64_t since = LOAD(g.c.inflight_since_ns);
    uint64_t inflight_us = since ? (now_ns() - since) / 1000u : 0;
    emit("H %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64,
         ADD(g.c.heartbeat_seq, 1), LOAD(g.c.ops), LOAD(g.c.reads), LOAD(g.c.writes), LOAD(g.c.pages), LOAD(g.c.violations),
         LOAD(g.c.io_errors), LOAD(g.c.io_max_us), LOAD(g.c.slow_ios), LOAD(g.c.slow_us), inflight_us);
  }
  return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Workloads (the simulator's, hypervisor/sim/guest.ts, plus memhog)                           */
/* ------------------------------------------------------------------------------------------ */

struct op_rand {
  uint32_t r1, r2, r3;
};

static struct op_rand op_rand(uint64_t i) {
  struct op_rand r = {mix_index(g.key ^ 0x1b873593u, i), mix_index(g.key ^ 0xcc9e2d51u, i), mix_index(g.key ^ 0xe6546b64u, i)};
  return r;
}

static void write_run(uint64_t first, uint64_t count, uint32_t *buf) {
  for (uint64_t k = 0; k < count; k++) block_content(buf + k * BLOCK_WORDS, g.key, first + k, g.table[first + k] + 1);
  if (!disk_io(true, buf, count * BLOCK_BYTES, first)) return;
  for (uint64_t k = 0; k < count; k++) g.table[first + k]++;
  ADD(g.c.writes, 1);
}

static void read_block(uint64_t block, uint32_t *buf, uint32_t *scratch) {
  if (!disk_io(false, buf, BLOCK_BYTES, block)) return;
  check_block(buf, block, "read", scratch);
  ADD(g.c.reads, 1);
}

static void memhog_op(const struct op_rand *r, uint64_t i) {
  if (!g.memhog) {
    g.memhog_pages = (uint64_t)g.memhog_mib * 256u;
    g.memhog = mmap(NULL, g.memhog_pages * 4096u, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g.memhog == MAP_FAILED) fatal("memhog: cannot map %u MiB: give the VM more memory or a smaller ferry.memhog_mib", g.memhog_mib);
  }
  uint64_t *slot = (uint64_t *)(g.memhog + (r->r3 % g.memhog_pages) * 4096u + (r->r1 % 512u) * 8u);
  *slot = i;
  ADD(g.c.pages, 1);
}

static void run_op(int w, uint64_t i, uint32_t *buf, uint32_t *scratch) {
  struct op_rand r = op_rand(i);
  uint64_t n = g.blocks;
  switch (w) {
  case W_SEQWRITE: {
    uint64_t runs = (n + SEQ_RUN_BLOCKS - 1) / SEQ_RUN_BLOCKS, first = (i % runs) * SEQ_RUN_BLOCKS;
    write_run(first, n - first < SEQ_RUN_BLOCKS ? n - first : SEQ_RUN_BLOCKS, buf);
    break;
  }
  case W_RANDWRITE:
    write_run(r.r2 % n, 1, buf);
    break;
  case W_MIXED: {
    uint64_t window = n < MIXED_WINDOW_BLOCKS ? n : MIXED_WINDOW_BLOCKS, start = (i / MIXED_DRIFT_OPS) % n;
    uint64_t block = (start + r.r2 % window) % n;
    if (r.r1 % 100u < 70u) read_block(block, buf, scratch);
    else write_run(block, 1, buf);
    break;
  }
  case W_READMOSTLY: {
    uint64_t hot = n < HOT_SET_BLOCKS ? n : HOT_SET_BLOCKS;
    uint64_t block = mix_index(g.key ^ 0x4f1bbcdcu, r.r2 % hot) % n;
    if (r.r1 % 100u < 95u) read_block(block, buf, scratch);
    else write_run(block, 1, buf);
    break;
  }
  case W_MEMHOG:
    memhog_op(&r, i);
    break;
  }
}

static void wait_settings(uint64_t seen, const struct timespec *until) {
  pthread_mutex_lock(&g.settings_lock);
  while (g.settings == seen) {
    if (until) {
      if (pthread_cond_timedwait(&g.settings_changed, &g.settings_lock, until) == ETIMEDOUT) break;
    } else {
      pthread_cond_wait(&g.settings_changed, &g.settings_lock);
    }
  }
  pthread_mutex_unlock(&g.settings_lock);
}

static void *workload_main(void *arg) {
  (void)arg;
  uint32_t *buf = aligned_alloc_or_die(SEQ_RUN_BLOCKS * BLOCK_BYTES);
  uint32_t *scratch = aligned_alloc_or_die(BLOCK_BYTES);
  for (;;) {
    pthread_mutex_lock(&g.settings_lock);
    uint64_t seen = g.settings;
    int w = g.workload;
    uint32_t rate = g.rate;
    pthread_mutex_unlock(&g.settings_lock);
    if (w == W_IDLE) {
      wait_settings(seen, NULL);
      continue;
    }
    /* Operation k of this setting is due at start + k/rate; a freeze or a slow I/O restarts the schedule. */
    uint64_t start = now_ns(), k = 0;
    while (LOAD(g.settings) == seen) {
      if (rate) {
        uint64_t due = start + k * 1000000000ull / rate, now = now_ns();
        if (now > due + 100000000ull) {
          start = now;
          k = 0;
          due = now;
        }
        if (due > now) {
          struct timespec ts = {.tv_sec = (time_t)(due / 1000000000u), .tv_nsec = (long)(due % 1000000000u)};
          wait_settings(seen, &ts);
          continue;
        }
      }
      /* Under disk_lock and re-checked there: once change_settings has taken the lock after a change,
         no operation of the old setting runs or counts (its reply is the line after which they stop). */
      pthread_mutex_lock(&g.disk_lock);
      if (LOAD(g.settings) != seen) {
        pthread_mutex_unlock(&g.disk_lock);
        break;
      }
      run_op(w, LOAD(g.c.ops), buf, scratch);
      ADD(g.c.ops, 1);
      pthread_mutex_unlock(&g.disk_lock);
      k++;
    }
  }
  return NULL;
}

static void change_settings(int workload, uint32_t rate, bool rate_given) {
  pthread_mutex_lock(&g.settings_lock);
  if (rate_given) {
    g.rate = rate;
    g.rate_set = true;
  }
  if (workload >= 0) {
    g.workload = workload;
    if (!g.rate_set) g.rate = DEFAULT_RATES[workload];
  }
  __atomic_add_fetch(&g.settings, 1, __ATOMIC_RELAXED);
  pthread_cond_broadcast(&g.settings_changed);
  pthread_mutex_unlock(&g.settings_lock);
  pthread_mutex_lock(&g.disk_lock); /* waits out an operation of the old setting in flight */
  pthread_mutex_unlock(&g.disk_lock);
}

/* ------------------------------------------------------------------------------------------ */
/* Commands                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static void reply_stats(const char *id) {
  pthread_mutex_lock(&g.settings_lock);
  int w = g.workload;
  uint32_t rate = g.rate;
  pthread_mutex_unlock(&g.settings_lock);
  emit("R %s ok workload=%s rate=%" PRIu32 " ops=%" PRIu64 " reads=%" PRIu64 " writes=%" PRIu64 " pages=%" PRIu64 " violations=%" PRIu64
       " io_errors=%" PRIu64 " io_max_us=%" PRIu64 " slow_ios=%" PRIu64 " slow_us=%" PRIu64 " heartbeat=%" PRIu64 " uptime_ms=%" PRIu64,
       id, WORKLOAD_NAMES[w], rate, LOAD(g.c.ops), LOAD(g.c.reads), LOAD(g.c.writes), LOAD(g.c.pages), LOAD(g.c.violations),
       LOAD(g.c.io_errors), LOAD(g.c.io_max_us), LOAD(g.c.slow_ios), LOAD(g.c.slow_us), LOAD(g.c.heartbeat_seq), uptime_ms());
}

static void info_fields(char *out, size_t size) {
  snprintf(out, size,
           "protocol=%d guest=%s seed=%" PRIu64 " blocks=%" PRIu64 " block_bytes=%u fill=%d rescan=%d heartbeat_ms=%" PRIu32 " slow_ms=%" PRIu32
           " memhog_mib=%" PRIu32 " boot_ms=%" PRIu64,
           PROTOCOL_VERSION, GUEST_VERSION, g.seed, g.blocks, BLOCK_BYTES, g.fill, g.rescan, g.heartbeat_ms, g.slow_ms, g.memhog_mib, g.boot_ms);
}

static void command_verify(const char *id) {
  uint32_t *buf = aligned_alloc_or_die(VERIFY_CHUNK_BLOCKS * BLOCK_BYTES);
  uint32_t *scratch = aligned_alloc_or_die(BLOCK_BYTES);
  uint64_t started = now_ns(), violations = 0, unreadable = 0;
  for (uint64_t first = 0; first < g.blocks; first += VERIFY_CHUNK_BLOCKS) {
    uint64_t count = g.blocks - first < VERIFY_CHUNK_BLOCKS ? g.blocks - first : VERIFY_CHUNK_BLOCKS;
    /* One chunk at a time under the disk lock: the workload goes on between chunks, never inside one. */
    pthread_mutex_lock(&g.disk_lock);
    if (disk_io(false, buf, count * BLOCK_BYTES, first)) {
      for (uint64_t k = 0; k < count; k++)
        if (!check_block(buf + k * BLOCK_WORDS, first + k, "verify", scratch)) violations++;
    } else {
      unreadable += count;
    }
    pthread_mutex_unlock(&g.disk_lock);
  }
  free(buf);
  free(scratch);
  emit("R %s ok checked=%" PRIu64 " violations=%" PRIu64 " unreadable=%" PRIu64 " ms=%" PRIu64, id, g.blocks - unreadable, violations, unreadable,
       (now_ns() - started) / 1000000u);
}

static bool valid_id(const char *id) {
  size_t n = strlen(id);
  if (n == 0 || n > 32) return false;
  for (const char *p = id; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-' || *p == '_' || *p == '.')) return false;
  return true;
}

static void handle_line(char *line) {
  char *save = NULL, *id = strtok_r(line, " ", &save);
  if (!id) return; /* empty line: ignored */
  if (!valid_id(id)) {
    emit("R - err bad-line a command line starts with an id of 1-32 characters [A-Za-z0-9._-], then a command");
    return;
  }
  char *verb = strtok_r(NULL, " ", &save), *arg = strtok_r(NULL, " ", &save), *extra = strtok_r(NULL, " ", &save);
  if (!verb) {
    emit("R %s err bad-line no command after the id: use ping, info, stats, rate N, workload NAME, verify or io-reset", id);
    return;
  }
  bool takes_arg = strcmp(verb, "rate") == 0 || strcmp(verb, "workload") == 0;
  if (extra || (arg && !takes_arg)) {
    emit("R %s err bad-argument too many arguments for %s", id, verb);
    return;
  }
  if (strcmp(verb, "ping") == 0) {
    emit("R %s ok", id);
  } else if (strcmp(verb, "info") == 0) {
    char fields[512];
    info_fields(fields, sizeof fields);
    emit("R %s ok %s", id, fields);
  } else if (strcmp(verb, "stats") == 0) {
    reply_stats(id);
  } else if (strcmp(verb, "rate") == 0) {
    uint64_t rate;
    if (!arg || !parse_u64(arg, MAX_RATE, &rate)) {
      emit("R %s err bad-argument rate takes ops per second, a whole number from 0 (unlimited) to %u", id, MAX_RATE);
      return;
    }
    change_settings(-1, (uint32_t)rate, true);
    emit("R %s ok rate=%" PRIu64, id, rate);
  } else if (strcmp(verb, "workload") == 0) {
    int w = arg ? workload_by_name(arg) : -1;
    if (w < 0) {
      emit("R %s err bad-argument workload takes one of idle, seqwrite, randwrite, mixed, readmostly, memhog", id);
      return;
    }
    change_settings(w, 0, false);
    pthread_mutex_lock(&g.settings_lock);
    uint32_t rate = g.rate;
    pthread_mutex_unlock(&g.settings_lock);
    emit("R %s ok workload=%s rate=%" PRIu32, id, WORKLOAD_NAMES[w], rate);
  } else if (strcmp(verb, "verify") == 0) {
    command_verify(id);
  } else if (strcmp(verb, "io-reset") == 0) {
    emit("R %s ok io_max_us=%" PRIu64, id, __atomic_exchange_n(&g.c.io_max_us, 0, __ATOMIC_RELAXED));
  } else {
    emit("R %s err unknown-command %s: use ping, info, stats, rate N, workload NAME, verify or io-reset", id, verb);
  }
}

static void command_loop(void) {
  char line[LINE_MAX_BYTES + 1];
  size_t len = 0;
  bool overlong = false;
  for (;;) {
    char buf[256];
    ssize_t n = read(g.chan, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fatal("reading the channel %s: %s", g.channel_path, n < 0 ? strerror(errno) : "end of file");
    for (ssize_t i = 0; i < n; i++) {
      char ch = buf[i];
      if (ch == '\r') continue;
      if (ch != '\n') {
        if (len < LINE_MAX_BYTES) line[len++] = ch;
        else overlong = true;
        continue;
      }
      line[len] = 0;
      if (overlong) emit("R - err bad-line longer than %d bytes", LINE_MAX_BYTES);
      else handle_line(line);
      len = 0;
      overlong = false;
    }
  }
}

/* ------------------------------------------------------------------------------------------ */

static int dump_block(int argc, char **argv) {
  uint64_t seed, block, version;
  if (argc != 5 || !parse_u64(argv[2], MAX_SEED, &seed) || !parse_u64(argv[3], UINT64_MAX, &block) || !parse_u64(argv[4], UINT32_MAX, &version)) {
    fprintf(stderr, "usage: ferry-guest --dump SEED BLOCK VERSION (whole numbers; SEED < 2^53, VERSION < 2^32)\n");
    return 2;
  }
  static uint32_t words[BLOCK_WORDS];
  block_content(words, seed_key(seed), block, (uint32_t)version);
  return fwrite(words, 1, BLOCK_BYTES, stdout) == BLOCK_BYTES && fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--dump") == 0) return dump_block(argc, argv);
  if (argc > 1) {
    fprintf(stderr, "usage: ferry-guest (as the guest's init) | ferry-guest --dump SEED BLOCK VERSION\n");
    return 2;
  }
  g.chan = -1;
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&g.settings_changed, &ca);

  parse_cmdline();
  open_channel();
  open_disk();
  struct rescan_result scan = {0, 0, 0, 0};
  if (g.rescan) scan = rescan_disk();
  else if (g.fill)
    for (uint64_t b = 0; b < g.blocks; b++) g.table[b] = 1;
  g.boot_ms = uptime_ms();

  char fields[512];
  info_fields(fields, sizeof fields);
  char line[768];
  snprintf(line, sizeof line, "FERRY-READY %s workload=%s rate=%" PRIu32 " rescan_ms=%" PRIu64 " rescan_nonzero=%" PRIu64 " rescan_unknown=%" PRIu64
           " rescan_max_version=%" PRIu32, fields, WORKLOAD_NAMES[g.workload], g.rate, scan.ms, scan.nonzero, scan.unknown, scan.max_version);
  console("%s", line);
  emit("%s", line);
  pthread_t hb, wl;
  if (pthread_create(&hb, NULL, heartbeat_main, NULL) || pthread_create(&wl, NULL, workload_main, NULL)) fatal("cannot start threads");
  command_loop();
}
