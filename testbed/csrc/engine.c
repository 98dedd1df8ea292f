/*
 * A stand-in inference engine for the test bed's real nodes.
 *
 * Binds (and listens on) a list of ports on ENGINE_BIND_ADDRESS (default
 * 0.0.0.0). ENGINE_PORTS says where the list comes from:
 *
 *   env (default)  every variable whose name ends in _PORT (except
 *                  KUBERNETES_*, the API server's Service env), and for a
 *                  variable ENGINE_SPAN_<NAME>=N the N ports from $NAME on
 *                  (a whole block): the ports Berth delivers.
 *   probe          ENGINE_PORT_COUNT ports the engine picks itself, each by
 *                  binding port 0 on the bind address, reading the port the
 *                  kernel chose (getsockname) and closing the socket: the
 *                  probe-then-bind pattern of engines that find a free port
 *                  early and bind it after start-up.
 *   fixed          ENGINE_PORT_COUNT ports from ENGINE_FIXED_BASE (default
 *                  29500) + ENGINE_RANK (default 0) * ENGINE_PORT_COUNT: a
 *                  default base plus a rank offset.
 *
 * ENGINE_STARTUP_MS=MS (or LO-HI: a random time in [LO, HI] per start) is
 * waited after the ports are chosen and before they are bound, as an engine
 * loads its model. A port already in use is reported loudly, as
 * "engine: EADDRINUSE: port P (NAME) ...", and the process exits 1. Then it
 * sleeps until SIGTERM/SIGINT and exits 0.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static volatile sig_atomic_t done;
static void on_signal(int sig) { (void)sig; done = 1; }

/* The ports to bind, in order, each with the name it is reported under. */
struct port { long number; char name[256]; };
static struct port *ports;
static int nports;

static int add_port(long number, const char *name) {
  if (number < 1 || number > 65535) {
    fprintf(stderr, "engine: port %ld (%s) is out of range\n", number, name);
    return -1;
  }
  struct port *grown = realloc(ports, (size_t)(nports + 1) * sizeof *ports);
  if (!grown) { perror("engine: realloc"); return -1; }
  ports = grown;
  ports[nports].number = number;
  snprintf(ports[nports].name, sizeof ports[nports].name, "%s", name);
  nports++;
  return 0;
}

static int parse_long(const char *name, const char *text, long min, long max, long *out) {
  char *end;
  errno = 0;
  long v = strtol(text, &end, 10);
  if (errno || *text == '\0' || *end != '\0' || v < min || v > max) {
    fprintf(stderr, "engine: %s=%s is not a number in %ld-%ld\n", name, text, min, max);
    return -1;
  }
  *out = v;
  return 0;
}

static int parse_port(const char *name, const char *text, long *out) {
  return parse_long(name, text, 1, 65535, out);
}

/* An env setting as a number, or the default when it is unset or empty. */
static int env_long(const char *name, long fallback, long min, long max, long *out) {
  const char *text = getenv(name);
  if (!text || !*text) { *out = fallback; return 0; }
  return parse_long(name, text, min, max, out);
}

static struct sockaddr_in address(struct in_addr addr, long port) {
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr = addr;
  sa.sin_port = htons((unsigned short)port);
  return sa;
}

/* env: every *_PORT variable, and the blocks ENGINE_SPAN_<NAME> widen. */
static int ports_from_env(void) {
  for (char **e = environ; *e; e++) {
    const char *eq = strchr(*e, '=');
    if (!eq) continue;
    size_t len = (size_t)(eq - *e);
    if (len < 5 || strncmp(eq - 5, "_PORT", 5) != 0) continue;
    /* The span settings, and the API server's Service env the kubelet
       adds to every pod (KUBERNETES_PORT=tcp://...), name no port of ours. */
    if (strncmp(*e, "ENGINE_SPAN_", 12) == 0 || strncmp(*e, "KUBERNETES_", 11) == 0) continue;
    char name[256];
    if (len >= sizeof name) continue;
    memcpy(name, *e, len);
    name[len] = '\0';
    long port, span = 1;
    if (parse_port(name, eq + 1, &port)) return -1;
    char span_var[300];
    snprintf(span_var, sizeof span_var, "ENGINE_SPAN_%s", name);
    const char *span_text = getenv(span_var);
    if (span_text && parse_port(span_var, span_text, &span)) return -1;
    for (long i = 0; i < span; i++)
      if (add_port(port + i, name)) return -1;
  }
  return 0;
}

/* probe: ask the kernel for a free port, note it, let it go. */
static int ports_from_probes(struct in_addr addr, long count) {
  for (long i = 0; i < count; i++) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) { perror("engine: socket"); return -1; }
    struct sockaddr_in sa = address(addr, 0);
    socklen_t len = sizeof sa;
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &len) != 0) {
      perror("engine: probing for a free port");
      close(fd);
      return -1;
    }
    close(fd);
    char name[64];
    snprintf(name, sizeof name, "probe-%ld", i);
    if (add_port(ntohs(sa.sin_port), name)) return -1;
  }
  return 0;
}

/* fixed: the default base plus this rank's offset. */
static int ports_from_base(long count) {
  long base, rank;
  if (env_long("ENGINE_FIXED_BASE", 29500, 1, 65535, &base) ||
      env_long("ENGINE_RANK", 0, 0, 65535, &rank))
    return -1;
  for (long i = 0; i < count; i++) {
    char name[64];
    snprintf(name, sizeof name, "rank-%ld+%ld", rank, i);
    if (add_port(base + rank * count + i, name)) return -1;
  }
  return 0;
}

/* ENGINE_STARTUP_MS: MS, or LO-HI for a random delay in [LO, HI]. */
static int startup_delay(long *ms) {
  const char *text = getenv("ENGINE_STARTUP_MS");
  *ms = 0;
  if (!text || !*text) return 0;
  long lo, hi;
  char extra;
  int n = sscanf(text, "%ld-%ld%c", &lo, &hi, &extra);
  if (n == 1) hi = lo;
  if ((n != 1 && n != 2) || lo < 0 || hi < lo || hi > 600000) {
    fprintf(stderr, "engine: ENGINE_STARTUP_MS=%s is not MS or LO-HI (at most 600000)\n", text);
    return -1;
  }
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  srand((unsigned)(now.tv_nsec ^ getpid()));
  *ms = lo + rand() % (hi - lo + 1);
  return 0;
}

static int bind_port(struct in_addr addr, const struct port *p) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) { perror("engine: socket"); return -1; }
  struct sockaddr_in sa = address(addr, p->number);
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 16) != 0) {
    int err = errno;
    if (err == EADDRINUSE)
      fprintf(stderr, "engine: EADDRINUSE: port %ld (%s) is already in use\n", p->number, p->name);
    else
      fprintf(stderr, "engine: binding port %ld (%s): %s\n", p->number, p->name, strerror(err));
    return -1;
  }
  printf("engine: listening on %s:%ld (%s)\n", inet_ntoa(addr), p->number, p->name);
  return 0;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  struct in_addr addr = {.s_addr = htonl(INADDR_ANY)};
  const char *bind_to = getenv("ENGINE_BIND_ADDRESS");
  if (bind_to && *bind_to && inet_pton(AF_INET, bind_to, &addr) != 1) {
    fprintf(stderr, "engine: ENGINE_BIND_ADDRESS=%s is not an IPv4 address\n", bind_to);
    return 2;
  }
  const char *mode = getenv("ENGINE_PORTS");
  if (!mode || !*mode) mode = "env";
  long count, delay;
  if (env_long("ENGINE_PORT_COUNT", 1, 1, 4096, &count) || startup_delay(&delay)) return 2;
  int chosen;
  if (strcmp(mode, "env") == 0)
    chosen = ports_from_env();
  else if (strcmp(mode, "probe") == 0)
    chosen = ports_from_probes(addr, count);
  else if (strcmp(mode, "fixed") == 0)
    chosen = ports_from_base(count);
  else {
    fprintf(stderr, "engine: ENGINE_PORTS=%s: expected env, probe or fixed\n", mode);
    return 2;
  }
  if (chosen) return 1;
  /* Handlers first: as PID 1 of its container, a signal without one is ignored. */
  signal(SIGTERM, on_signal);
  signal(SIGINT, on_signal);
  if (delay) {
    printf("engine: %d ports from %s, starting up for %ld ms\n", nports, mode, delay);
    struct timespec wait = {.tv_sec = delay / 1000, .tv_nsec = (delay % 1000) * 1000000L};
    while (!done && nanosleep(&wait, &wait) != 0 && errno == EINTR) continue;
  }
  for (int i = 0; i < nports && !done; i++)
    if (bind_port(addr, &ports[i])) return 1;
  if (!done) printf("engine: ready, %d ports bound\n", nports);
  while (!done) pause();
  printf("engine: stopping\n");
  return 0;
}
