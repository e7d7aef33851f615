/*
 * noop: a WASI command that does nothing and exits 0.
 *
 * Used by the overhead benchmarks: everything measured when running it is the
 * cost of instantiating and running a module, not the module's own work.
 */
int main(void) {
    return 0;
}
