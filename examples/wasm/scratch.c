/* scratch: a module that uses its per-job scratch directory and tries to leave it, for the tests.
 *
 * Hearth preopens one fresh, empty directory per job as /scratch (read-write) and nothing else
 * of the filesystem; WASI preview 1 has no call that creates a socket. Without arguments the
 * module reports, one line each, that /scratch works (empty at start, a file written and read
 * back, a subdirectory) and that every way out fails: other absolute paths, "..", symlinks
 * pointing outside, and sockets. A denied attempt prints "denied" and the errno text; the
 * module exits 0 either way: failing cleanly means the guest gets an error, not a trap.
 *
 *   scratch            the report
 *   scratch fill N     write N bytes to /scratch/fill (for the scratch size limit)
 *   scratch hold       write /scratch/held, then spin until the fuel runs out (a test kills
 *                      the worker meanwhile: the next worker removes what this job left)
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static void outcome(const char *what, int ok, int err) {
    if (ok)
        printf("%s: ok\n", what);
    else
        printf("%s: failed (%s)\n", what, strerror(err));
}

/* An attempt that must not succeed: "denied" plus why, or ALLOWED. */
static void denied(const char *what, int allowed, int err) {
    if (allowed)
        printf("%s: ALLOWED\n", what);
    else
        printf("%s: denied (%s)\n", what, strerror(err));
}

static int try_open(const char *path, int flags) {
    int fd = open(path, flags, 0600);
    int err = errno;
    if (fd >= 0) close(fd);
    errno = err;
    return fd >= 0;
}

static int try_opendir(const char *path) {
    DIR *d = opendir(path);
    int err = errno;
    if (d) closedir(d);
    errno = err;
    return d != NULL;
}

static int count_entries(const char *path) {
    DIR *d = opendir(path);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) n++;
    closedir(d);
    return n;
}

static int fill(long n) {
    static char block[65536];
    memset(block, 'x', sizeof block);
    FILE *f = fopen("/scratch/fill", "w");
    if (!f) {
        printf("fill: failed (%s)\n", strerror(errno));
        return 1;
    }
    for (long left = n; left > 0;) {
        size_t chunk = left < (long)sizeof block ? (size_t)left : sizeof block;
        if (fwrite(block, 1, chunk, f) != chunk) {
            printf("fill: failed (%s)\n", strerror(errno));
            fclose(f);
            return 1;
        }
        left -= (long)chunk;
    }
    fclose(f);
    printf("fill: %ld bytes\n", n);
    return 0;
}

static int hold(void) {
    FILE *f = fopen("/scratch/held", "w");
    if (!f) return 1;
    fputs("held", f);
    fclose(f);
    for (volatile unsigned long i = 0;; i++) {
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "fill") == 0) return fill(atol(argv[2]));
    if (argc == 2 && strcmp(argv[1], "hold") == 0) return hold();

    /* Fresh per job: nothing left by an earlier one. */
    int entries = count_entries("/scratch");
    outcome("scratch empty at start", entries == 0, entries < 0 ? errno : EEXIST);

    const char note[] = "written in the sandbox";
    char back[64] = {0};
    FILE *w = fopen("/scratch/note.txt", "w");
    int ok = w != NULL && fputs(note, w) >= 0;
    int err = errno;
    if (w) ok = (fclose(w) == 0) && ok;
    FILE *r = ok ? fopen("/scratch/note.txt", "r") : NULL;
    if (r) {
        ok = fgets(back, sizeof back, r) != NULL && strcmp(back, note) == 0;
        err = errno;
        fclose(r);
    }
    outcome("scratch write and read back", ok && r != NULL, err);

    ok = mkdir("/scratch/sub", 0700) == 0 && try_open("/scratch/sub/x", O_CREAT | O_WRONLY);
    outcome("scratch subdirectory", ok, errno);

    /* Everything below must fail. */
    denied("read /etc/passwd", try_open("/etc/passwd", O_RDONLY), errno);
    denied("read ../etc/passwd", try_open("../etc/passwd", O_RDONLY), errno);
    denied("read /scratch/../../etc/passwd",
           try_open("/scratch/../../etc/passwd", O_RDONLY), errno);
    denied("list /scratch/..", try_opendir("/scratch/.."), errno);
    denied("list /", try_opendir("/"), errno);
    denied("create /tmp/hearth-escape", try_open("/tmp/hearth-escape", O_CREAT | O_WRONLY), errno);
    denied("read /proc/self/environ", try_open("/proc/self/environ", O_RDONLY), errno);

    /* A symlink may be created (it is only a name), but following it out must fail. */
    (void)symlink("/etc/passwd", "/scratch/abs-link");
    denied("follow symlink to /etc/passwd", try_open("/scratch/abs-link", O_RDONLY), errno);
    (void)symlink("../../../../../../etc", "/scratch/up-link");
    denied("follow symlink to ../../etc", try_open("/scratch/up-link/passwd", O_RDONLY), errno);

    /* WASI preview 1 cannot create sockets (wasi-libc declares no socket(), connect() or
     * bind() for it); the only socket calls work on sockets the host preopened, and Hearth
     * preopens none. So: every descriptor a preopened socket could have is tried. */
    int accepted = 0, last = 0;
    for (int fd = 0; fd < 64; fd++) {
        int s = accept(fd, NULL, NULL);
        if (s >= 0) {
            accepted = 1;
            close(s);
        } else {
            last = errno;
        }
    }
    denied("accept on any descriptor", accepted, last);
    denied("send on stdout", send(1, "x", 1, 0) >= 0, errno);
    return 0;
}
