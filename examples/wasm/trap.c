/*
 * trap: a hostile module for tests. It executes `unreachable` at once, so the
 * runtime must report a trap (not an exit code) and the gateway must turn that
 * into a job error without harming anything else.
 */
#include <stdio.h>

int main(void) {
    fputs("trap: about to trap\n", stderr);
    __builtin_trap();
}
