/* What one SHA-256 call costs through each OpenSSL 3 API the native core could use, on a
 * ~450-byte Sig_structure and on a 64-byte input (bench/README.md, "session 5"):
 *
 *     cc -O2 bench/sha256_calls.c -o /tmp/sha256_calls -lcrypto && /tmp/sha256_calls
 *
 * SHA256() makes an implicit fetch of the digest on every call; EVP_Digest with a digest
 * fetched once does not; a context kept per thread (dcccore.c's dcc_sha256) also saves the
 * context's allocation. Thread CPU time, two rounds. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <time.h>

static double cpu(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(void)
{
    unsigned char buf[450], md[32];
    for (int i = 0; i < 450; i++) buf[i] = (unsigned char)(i * 7);
    const int n = 400000;
    EVP_MD *sha = EVP_MD_fetch(NULL, "SHA2-256", NULL);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (sha == NULL || ctx == NULL) return 1;
    const size_t lengths[2] = {450, 64};
    for (int round = 0; round < 2; round++) {
        for (int k = 0; k < 2; k++) {
            size_t len = lengths[k];
            double t = cpu();
            for (int i = 0; i < n; i++) {
                buf[0] = (unsigned char)i;
                SHA256(buf, len, md);
            }
            double one_shot = (cpu() - t) / n * 1e9;
            t = cpu();
            for (int i = 0; i < n; i++) {
                buf[0] = (unsigned char)i;
                EVP_Digest(buf, len, md, NULL, sha, NULL);
            }
            double fetched = (cpu() - t) / n * 1e9;
            t = cpu();
            for (int i = 0; i < n; i++) {
                buf[0] = (unsigned char)i;
                EVP_DigestInit_ex2(ctx, sha, NULL);
                EVP_DigestUpdate(ctx, buf, len);
                EVP_DigestFinal_ex(ctx, md, NULL);
            }
            double kept = (cpu() - t) / n * 1e9;
            printf("round %d, %3zu bytes: SHA256() %4.0f ns, EVP_Digest(fetched) %4.0f ns, "
                   "context per thread %4.0f ns\n", round, len, one_shot, fetched, kept);
        }
    }
    EVP_MD_CTX_free(ctx);
    EVP_MD_free(sha);
    return 0;
}
