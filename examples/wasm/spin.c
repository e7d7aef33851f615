/*
 * spin: a hostile module for tests. It loops forever without doing any I/O, so
 * only fuel or epoch interruption (the CPU-time limit) can stop it. The
 * volatile counter keeps the compiler from removing the loop, which it may do
 * for a side-effect-free infinite loop.
 */
int main(void) {
    volatile unsigned long counter = 0;
    for (;;) {
        counter = counter + 1;
    }
}
