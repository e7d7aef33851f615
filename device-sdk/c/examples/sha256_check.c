/* The library's SHA-256 against FIPS 180-4's examples and lengths around the padding's edges
 * (each compared with the digest given on the command line, or printed with --print). */
#include "hearth.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    static const struct { const char *in; const char *hex; } known[] = {
        {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
        {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
    };
    int bad = 0;
    char out[65];
    for (size_t i = 0; i < sizeof known / sizeof *known; i++) {
        hearth_sha256_hex(known[i].in, strlen(known[i].in), out);
        if (strcmp(out, known[i].hex) != 0) {
            printf("FAIL %zu: %s\n", i, out);
            bad = 1;
        }
    }
    /* --print: the digest of 'a' repeated n times for n in 0..200, one per line (the Python
     * test compares them with hashlib's). */
    if (argc > 1 && strcmp(argv[1], "--print") == 0) {
        char buf[200];
        memset(buf, 'a', sizeof buf);
        for (size_t n = 0; n <= sizeof buf; n++) {
            hearth_sha256_hex(buf, n, out);
            printf("%s\n", out);
        }
    }
    if (!bad)
        fprintf(stderr, "sha256: ok\n");
    return bad;
}
