/*
 * The pod sandbox's process: does nothing until SIGTERM/SIGINT, reaping any
 * child re-parented to it (it is PID 1 of the pod's namespaces).
 */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t done;
static void on_stop(int sig) { (void)sig; done = 1; }
static void on_child(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  signal(SIGTERM, on_stop);
  signal(SIGINT, on_stop);
  signal(SIGCHLD, on_child);
  while (!done) pause();
  return 0;
}
