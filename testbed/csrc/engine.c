/*
 * A stand-in inference engine for the test bed's real nodes.
 *
 * Binds (and listens on) every port named in its environment: each variable
 * whose name ends in _PORT (except KUBERNETES_*, the API server's Service
 * env), and for a variable ENGINE_SPAN_<NAME>=N the N
 * ports from $NAME on (a whole block). ENGINE_BIND_ADDRESS picks the address
 * (default 0.0.0.0). A port already in use is reported loudly with its
 * variable and the process exits 1: Berth handed out a port that was not free.
 * Then it sleeps until SIGTERM/SIGINT and exits 0.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

extern char **environ;

static volatile sig_atomic_t done;
static void on_signal(int sig) { (void)sig; done = 1; }

static int parse_port(const char *name, const char *text, long *out) {
  char *end;
  errno = 0;
  long v = strtol(text, &end, 10);
  if (errno || *text == '\0' || *end != '\0' || v < 1 || v > 65535) {
    fprintf(stderr, "engine: %s=%s is not a port\n", name, text);
    return -1;
  }
  *out = v;
  return 0;
}

static int bind_port(struct in_addr addr, const char *name, long port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) { perror("engine: socket"); return -1; }
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr = addr;
  sa.sin_port = htons((unsigned short)port);
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 16) != 0) {
    int err = errno;
    if (err == EADDRINUSE)
      fprintf(stderr, "engine: EADDRINUSE: port %ld (%s) is already in use\n", port, name);
    else
      fprintf(stderr, "engine: binding port %ld (%s): %s\n", port, name, strerror(err));
    return -1;
  }
  printf("engine: listening on %s:%ld (%s)\n", inet_ntoa(addr), port, name);
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
  int bound = 0;
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
    if (parse_port(name, eq + 1, &port)) return 1;
    char span_var[300];
    snprintf(span_var, sizeof span_var, "ENGINE_SPAN_%s", name);
    const char *span_text = getenv(span_var);
    if (span_text && parse_port(span_var, span_text, &span)) return 1;
    for (long i = 0; i < span; i++) {
      if (port + i > 65535 || bind_port(addr, name, port + i)) return 1;
      bound++;
    }
  }
  printf("engine: ready, %d ports bound\n", bound);
  signal(SIGTERM, on_signal);
  signal(SIGINT, on_signal);
  while (!done) pause();
  printf("engine: stopping\n");
  return 0;
}
