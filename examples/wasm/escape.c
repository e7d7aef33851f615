/* escape: a module that tries to leave its sandbox, for the tests.
 *
 * It tries to read /etc/passwd, to write a file, to list the root directory and to read the
 * environment, and prints what happened to each. Under Hearth every attempt must fail cleanly
 * (nothing preopened but /scratch, and relative paths resolve from / outside it; an empty
 * environment; no sockets in WASI preview 1): the module still exits 0 and its report says
 * "denied" four times. scratch.c covers /scratch itself and more ways out.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void report(const char *what, int ok) {
    printf("%s: %s\n", what, ok ? "ALLOWED" : "denied");
}

int main(void) {
    FILE *f = fopen("/etc/passwd", "r");
    report("read /etc/passwd", f != NULL);
    if (f) fclose(f);

    FILE *w = fopen("escape.txt", "w");
    report("write escape.txt", w != NULL);
    if (w) fclose(w);

    DIR *d = opendir("/");
    report("list /", d != NULL);
    if (d) closedir(d);

    const char *home = getenv("HOME");
    const char *path = getenv("PATH");
    report("environment", home != NULL || path != NULL);
    return 0;
}
