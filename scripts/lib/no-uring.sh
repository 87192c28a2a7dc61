# shellcheck shell=bash
# build_no_uring DIR: build DIR/no-uring, which runs CMD... with io_uring_setup(2) failing with
# ENOSYS, so the daemon under valgrind (which cannot follow io_uring) falls back to its polling
# driver. Used by scripts/instructions.sh and scripts/instructions-daemons.sh.
build_no_uring() {
  cat >"$1/no-uring.c" <<'C'
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    if (argc < 2 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
        perror("no-uring");
        return 1;
    }
    execvp(argv[1], argv + 1);
    perror("no-uring: exec");
    return 1;
}
C
  cc -O2 -o "$1/no-uring" "$1/no-uring.c"
}
