/*
 * noncepool.c: see noncepool.h for the contracts and the rules.
 */
#define _GNU_SOURCE
/* EC_POINT_get_Jprojective_coordinates_GFp is deprecated in OpenSSL 3.0 (with no successor),
 * yet it is the only way to read a point before its conversion to affine coordinates, which
 * the batch conversion of a refill chunk needs (one field inversion per chunk instead of one
 * per entry). It is in every 3.x libcrypto that is not built with no-deprecated; where it is
 * missing (OPENSSL_NO_DEPRECATED_3_0), make_chunk converts each point on its own instead. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include "noncepool.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/obj_mac.h>
#include <openssl/rand.h>

/* 16 Mi entries (1 GiB): far beyond any burst, small enough that a typo is refused. */
#define POOL_MAX_ENTRIES ((size_t)1 << 24)

/* A modulus (the group order n, or the field prime) with what Montgomery multiplication and
 * inversion by Fermat's little theorem need. */
typedef struct {
    BIGNUM *m, *m_minus_2;
    BIGNUM *one; /* 1 in Montgomery form: 2^256 mod m */
    BN_MONT_CTX *mont;
} modulus;

struct dcc_pool {
    pthread_mutex_t lock;
    uint8_t *mem;   /* capacity entries; [0, level) live, the rest zeros */
    size_t map_len; /* bytes mapped (whole pages) */
    size_t capacity, level;
    uint64_t refilled, spent, misses, discarded;
    pid_t owner;          /* the process that made the pool */
    volatile int orphan;  /* set once in a forked child */
    int locked, dontdump, wipeonfork, lock_errno;
    /* the background refill thread */
    pthread_cond_t room;  /* signalled when an entry is taken while the thread waits */
    pthread_t thread;
    int thread_running, stopping, refill_waiting, refill_policy, sync_ready;
    int signing; /* batches inside dcc_pool_enter/leave: the refill thread waits for 0 */
    EC_GROUP *group;
    modulus n;     /* the group order */
    modulus field; /* the prime of the curve's field */
    BIGNUM *half_order;
    BIGNUM *d_mont; /* the private scalar d * 2^256 mod n (Montgomery form) */
};

struct dcc_pool_work {
    BN_CTX *ctx;
    BIGNUM *z, *r, *kinv, *t, *s;
};

/* In a forked child the mapping already reads as zeros (MADV_WIPEONFORK, where the kernel
 * has it); the pid check makes the rule hold without it. No lock: the parent may have held
 * it at fork time, and the child's copy of a held mutex never unlocks. */
static int orphaned(dcc_pool *p)
{
    if (p->orphan) return 1;
    if (getpid() == p->owner) return 0;
    OPENSSL_cleanse(p->mem, p->map_len);
    p->discarded += p->level;
    p->level = 0;
    p->orphan = 1;
    return 1;
}

static void set_err(char *err, size_t errlen, const char *msg)
{
    snprintf(err, errlen, "%s", msg);
}

static void modulus_free(modulus *md)
{
    BN_free(md->m);
    BN_free(md->m_minus_2);
    BN_free(md->one);
    BN_MONT_CTX_free(md->mont);
    memset(md, 0, sizeof *md);
}

static int modulus_set(modulus *md, const BIGNUM *m, BN_CTX *ctx)
{
    md->m = BN_dup(m);
    md->m_minus_2 = BN_dup(m);
    md->one = BN_new();
    md->mont = BN_MONT_CTX_new();
    return md->m != NULL && md->m_minus_2 != NULL && md->one != NULL && md->mont != NULL &&
           BN_sub_word(md->m_minus_2, 2) && BN_MONT_CTX_set(md->mont, md->m, ctx) &&
           BN_to_montgomery(md->one, BN_value_one(), md->mont, ctx);
}

/* The P-256 group and its two moduli; 1, or 0 when OpenSSL failed. */
static int p256_setup(EC_GROUP **group, modulus *n, modulus *field, BN_CTX *ctx)
{
    BIGNUM *prime = BN_new();
    int ok = prime != NULL &&
             (*group = EC_GROUP_new_by_curve_name(NID_X9_62_prime256v1)) != NULL &&
             EC_GROUP_get_curve(*group, prime, NULL, NULL, ctx) &&
             modulus_set(n, EC_GROUP_get0_order(*group), ctx) && modulus_set(field, prime, ctx);
    BN_free(prime);
    return ok;
}

dcc_pool *dcc_pool_new(EVP_PKEY *pkey, size_t capacity, char *err, size_t errlen)
{
    char group_name[64];
    size_t glen = 0;
    BIGNUM *d = NULL;
    BN_CTX *ctx = NULL;
    dcc_pool *p = NULL;

    if (capacity == 0 || capacity > POOL_MAX_ENTRIES) {
        set_err(err, errlen, "nonce pool capacity must be 1 to 16777216 entries");
        return NULL;
    }
    if (!EVP_PKEY_is_a(pkey, "EC") ||
        !EVP_PKEY_get_group_name(pkey, group_name, sizeof group_name, &glen) ||
        strcmp(group_name, "prime256v1") != 0) {
        set_err(err, errlen, "a nonce pool needs an EC P-256 (ES256) key");
        return NULL;
    }
    if (!EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_PRIV_KEY, &d)) {
        set_err(err, errlen, "the key holds no private scalar (a token key cannot have a pool)");
        goto fail;
    }
    p = calloc(1, sizeof *p);
    ctx = BN_CTX_new();
    if (p == NULL || ctx == NULL) goto nomem;
    p->owner = getpid();
    p->capacity = capacity;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) page = 4096;
    p->map_len = (capacity * DCC_POOL_ENTRY_SIZE + (size_t)page - 1) / (size_t)page * (size_t)page;
    /* MAP_POPULATE: the pool's memory is committed now, locked or not (mlock commits it too),
     * so keyd's resident size does not creep up while the pool first fills during traffic;
     * a full pool is its normal state anyway. */
    void *mem = mmap(NULL, p->map_len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        p->mem = NULL;
        goto nomem;
    }
    p->mem = mem;
#ifdef MADV_DONTDUMP
    p->dontdump = madvise(mem, p->map_len, MADV_DONTDUMP) == 0;
#endif
#ifdef MADV_WIPEONFORK
    p->wipeonfork = madvise(mem, p->map_len, MADV_WIPEONFORK) == 0;
#endif
    if (mlock(mem, p->map_len) == 0) {
        p->locked = 1;
    } else {
        p->lock_errno = errno;
    }
    if (pthread_mutex_init(&p->lock, NULL) != 0) goto nomem;
    if (pthread_cond_init(&p->room, NULL) != 0) {
        pthread_mutex_destroy(&p->lock);
        goto nomem;
    }
    p->sync_ready = 1;

    if (!p256_setup(&p->group, &p->n, &p->field, ctx)) goto ossl;
    p->half_order = BN_new();
    p->d_mont = BN_new();
    if (p->half_order == NULL || p->d_mont == NULL) goto ossl;
    BN_set_flags(d, BN_FLG_CONSTTIME);
    BN_set_flags(p->d_mont, BN_FLG_CONSTTIME);
    if (!BN_rshift1(p->half_order, p->n.m) || !BN_to_montgomery(p->d_mont, d, p->n.mont, ctx))
        goto ossl;
    BN_clear_free(d);
    BN_CTX_free(ctx);
    return p;

ossl:
    ERR_clear_error();
    set_err(err, errlen, "OpenSSL could not set up the nonce pool");
    goto fail;
nomem:
    set_err(err, errlen, "no memory for the nonce pool");
fail:
    BN_clear_free(d);
    BN_CTX_free(ctx);
    if (p != NULL) {
        if (p->mem != NULL) {
            if (p->locked) munlock(p->mem, p->map_len);
            munmap(p->mem, p->map_len);
        }
        p->mem = NULL;
        p->map_len = 0;
        dcc_pool_free(p);
    }
    return NULL;
}

void dcc_pool_free(dcc_pool *p)
{
    if (p == NULL) return;
    /* In a forked child the parent's refill thread does not exist and the lock may be held
     * forever: wipe and unmap without touching either. */
    int orphan = orphaned(p);
    if (!orphan && p->thread_running) {
        pthread_mutex_lock(&p->lock);
        p->stopping = 1;
        pthread_cond_broadcast(&p->room);
        pthread_mutex_unlock(&p->lock);
        pthread_join(p->thread, NULL);
        p->thread_running = 0;
    }
    if (p->mem != NULL) {
        OPENSSL_cleanse(p->mem, p->map_len);
        if (p->locked) munlock(p->mem, p->map_len);
        munmap(p->mem, p->map_len);
    }
    if (p->sync_ready && !orphan) {
        pthread_cond_destroy(&p->room);
        pthread_mutex_destroy(&p->lock);
    }
    BN_clear_free(p->d_mont);
    modulus_free(&p->n);
    modulus_free(&p->field);
    BN_free(p->half_order);
    EC_GROUP_free(p->group);
    OPENSSL_cleanse(p, sizeof *p);
    free(p);
}

/* ----------------------------------------------------------------------------- refill
 *
 * An entry needs r = x(kG) mod n and k^-1 mod n. Done one entry at a time, the two
 * inversions (of Z for the affine x, and of k) cost more than the scalar multiplication;
 * an entry then cost more than a whole signature. A refill therefore works in chunks of up
 * to DCC_POOL_REFILL_CHUNK entries:
 *   - the nonces come from one RAND_priv_bytes call per chunk, 32 fresh bytes per nonce
 *     (rejection sampling into [1, n-1], as BN_priv_rand_range does, without its per-call
 *     DRBG overhead);
 *   - kG is EC_POINT_mul with the generator, which on x86_64 is OpenSSL's nistz256 code with
 *     its precomputed generator table (constant time, nothing computed per call), and its
 *     result is read in Jacobian coordinates (X, Y, Z): x = X / Z^2;
 *   - Montgomery's trick inverts all the Z^2 of a chunk with one inversion mod p, and all
 *     the k of a chunk with one inversion mod n (batch_inverse).
 */

/* The scratch of a refill: one chunk's numbers and points, allocated once per
 * dcc_pool_refill call or for the life of the refill thread (not per chunk). Every secret
 * in it is cleared at the end of each chunk. */
typedef struct {
    size_t slots; /* entries a chunk may hold: 1..DCC_POOL_REFILL_CHUNK */
    BN_CTX *ctx;
    EC_POINT *point[DCC_POOL_REFILL_CHUNK];
    BIGNUM *k[DCC_POOL_REFILL_CHUNK];   /* nonce k, then k R, then k^-1 R mod n */
    BIGNUM *x[DCC_POOL_REFILL_CHUNK];   /* X of kG (Jacobian), then the affine x, then r */
    BIGNUM *zz[DCC_POOL_REFILL_CHUNK];  /* Z^2 R mod p, then Z^-2 R mod p */
    BIGNUM *acc[DCC_POOL_REFILL_CHUNK]; /* batch_inverse's running products */
    BIGNUM *blind, *t, *u;
    uint8_t ok_z[DCC_POOL_REFILL_CHUNK], ok_k[DCC_POOL_REFILL_CHUNK];
    uint8_t rnd[DCC_POOL_REFILL_CHUNK * 32];
    uint8_t out[DCC_POOL_REFILL_CHUNK * DCC_POOL_ENTRY_SIZE]; /* finished entries */
} refill_work;

static void refill_work_free(refill_work *w)
{
    if (w == NULL) return;
    for (size_t i = 0; i < w->slots; i++) {
        EC_POINT_clear_free(w->point[i]);
        BN_clear_free(w->k[i]);
        BN_clear_free(w->x[i]);
        BN_clear_free(w->zz[i]);
        BN_clear_free(w->acc[i]);
    }
    BN_clear_free(w->blind);
    BN_clear_free(w->t);
    BN_clear_free(w->u);
    BN_CTX_free(w->ctx);
    OPENSSL_cleanse(w, sizeof *w);
    free(w);
}

/* A BIGNUM for a secret value: on the secure heap, and constant-time in every operation. */
static BIGNUM *secret_bn_new(void)
{
    BIGNUM *b = BN_secure_new();
    if (b != NULL) BN_set_flags(b, BN_FLG_CONSTTIME);
    return b;
}

/* Scratch for chunks of up to `slots` entries (group: for the points; NULL for none). */
static refill_work *refill_work_new(const EC_GROUP *group, size_t slots)
{
    refill_work *w = calloc(1, sizeof *w);
    if (w == NULL) return NULL;
    if (slots > DCC_POOL_REFILL_CHUNK) slots = DCC_POOL_REFILL_CHUNK;
    w->slots = slots;
    int ok = (w->ctx = BN_CTX_secure_new()) != NULL;
    BIGNUM **secret[] = {&w->blind, &w->t, &w->u};
    for (size_t j = 0; ok && j < sizeof secret / sizeof *secret; j++)
        ok = (*secret[j] = secret_bn_new()) != NULL;
    for (size_t i = 0; ok && i < slots; i++)
        ok = (w->k[i] = secret_bn_new()) != NULL && (w->x[i] = BN_new()) != NULL &&
             (w->zz[i] = secret_bn_new()) != NULL && (w->acc[i] = secret_bn_new()) != NULL &&
             (group == NULL || (w->point[i] = EC_POINT_new(group)) != NULL);
    if (!ok) {
        refill_work_free(w);
        return NULL;
    }
    return w;
}

/* out := a uniform value in [1, m-1] from 32 random bytes, drawing 32 fresh bytes again as
 * long as the value falls outside (m > 2^255 for both P-256 moduli: at most 2^-32 of
 * draws). 0 when the random source failed. */
static int scalar_from(BIGNUM *out, uint8_t bytes[32], const BIGNUM *m)
{
    for (;;) {
        if (BN_bin2bn(bytes, 32, out) == NULL) return 0;
        if (!BN_is_zero(out) && BN_cmp(out, m) < 0) break;
        if (RAND_priv_bytes(bytes, 32) != 1) return 0;
    }
    OPENSSL_cleanse(bytes, 32);
    return 1;
}

/* Montgomery's trick: a[i] (each in Montgomery form, a_i R mod m, for i < count) becomes its
 * inverse in Montgomery form, a_i^-1 R mod m, with ONE modular inversion for all of them:
 * with running products c_i = a_0 ... a_i, 1 / a_i = c_(i-1) / c_i, and 1 / c_(i-1) =
 * a_i / c_i, from the last to the first.
 *
 * A zero a[i] has no inverse: ok[i] = 0 and a[i] stays 0, and it is left out of the product
 * (its running product repeats the previous one), so it cannot spoil the others. The refill
 * never passes one (k is in [1, n-1], Z is 0 only at infinity, which kG with such a k is
 * not); dcc_pool_batch_inverse tests the rule.
 *
 * The inputs are secrets (nonces; the Z of kG, which can reveal bits of k), and so is their
 * product. The inversion is Fermat's (c^(m-2) mod m, BN_mod_exp_mont_consttime), constant
 * time in its argument, and it does not even see the product: it inverts c * b for a fresh
 * random b in [1, m-1] (blind), then multiplies by b again. c * b is uniform and independent
 * of the inputs, so whatever the inversion might leak through a side channel says nothing
 * about them (OpenSSL blinds its own field inversions the same way). 1, or 0 when OpenSSL
 * failed. */
static int batch_inverse(const modulus *md, BIGNUM **a, size_t count, uint8_t *ok,
                         const BIGNUM *blind, refill_work *w)
{
    BN_CTX *ctx = w->ctx;
    BN_MONT_CTX *mont = md->mont;
    const BIGNUM *prev = md->one;
    for (size_t i = 0; i < count; i++) {
        ok[i] = !BN_is_zero(a[i]);
        if (ok[i] ? !BN_mod_mul_montgomery(w->acc[i], prev, a[i], mont, ctx)
                  : BN_copy(w->acc[i], prev) == NULL)
            return 0;
        prev = w->acc[i];
    }
    /* inv = (c b)^-1 b = c^-1, in Montgomery form: c^-1 R */
    BIGNUM *bR = w->t, *inv = w->u;
    if (!BN_to_montgomery(bR, blind, mont, ctx) ||
        !BN_mod_mul_montgomery(inv, prev, bR, mont, ctx) ||
        !BN_from_montgomery(inv, inv, mont, ctx) ||
        !BN_mod_exp_mont_consttime(inv, inv, md->m_minus_2, md->m, ctx, mont) ||
        !BN_to_montgomery(inv, inv, mont, ctx) ||
        !BN_mod_mul_montgomery(inv, inv, bR, mont, ctx))
        return 0;
    BIGNUM *next = w->t; /* bR is no longer needed */
    for (size_t i = count; i-- > 0;) {
        if (!ok[i]) continue;
        const BIGNUM *before = i > 0 ? w->acc[i - 1] : md->one;
        /* next = (a_0 ... a_(i-1))^-1 R; a[i] = inv * c_(i-1) = a_i^-1 R */
        if (!BN_mod_mul_montgomery(next, inv, a[i], mont, ctx) ||
            !BN_mod_mul_montgomery(a[i], inv, before, mont, ctx))
            return 0;
        BIGNUM *swap = inv;
        inv = next;
        next = swap;
    }
    return 1;
}

static void clear_chunk(refill_work *w, size_t count, const EC_GROUP *group)
{
    for (size_t i = 0; i < count; i++) {
        BN_clear(w->k[i]);
        BN_clear(w->x[i]);
        BN_clear(w->zz[i]);
        BN_clear(w->acc[i]);
        if (group != NULL && w->point[i] != NULL) EC_POINT_set_to_infinity(group, w->point[i]);
    }
    BN_clear(w->blind);
    BN_clear(w->t);
    BN_clear(w->u);
    OPENSSL_cleanse(w->rnd, sizeof w->rnd);
}

/* Computes `count` (1..w->slots) entries into w->out, packed; returns how many there are
 * (count, less only if some r was 0: probability ~2^-256 each), or (size_t)-1 when OpenSSL
 * failed. */
static size_t make_chunk(dcc_pool *p, refill_work *w, size_t count)
{
    size_t made = (size_t)-1;
    BN_CTX *ctx = w->ctx;
    if (RAND_priv_bytes(w->rnd, (int)(32 * count)) != 1) goto done;
    for (size_t i = 0; i < count; i++)
        if (!scalar_from(w->k[i], w->rnd + 32 * i, p->n.m)) goto done;
    for (size_t i = 0; i < count; i++) {
        if (!EC_POINT_mul(p->group, w->point[i], w->k[i], NULL, NULL, ctx)) goto done;
#ifndef OPENSSL_NO_DEPRECATED_3_0
        /* Z^2 R mod p, for the batch inversion: x = X / Z^2 */
        if (!EC_POINT_get_Jprojective_coordinates_GFp(p->group, w->point[i], w->x[i], NULL,
                                                      w->zz[i], ctx) ||
            !BN_to_montgomery(w->zz[i], w->zz[i], p->field.mont, ctx) ||
            !BN_mod_mul_montgomery(w->zz[i], w->zz[i], w->zz[i], p->field.mont, ctx))
            goto done;
#else
        /* no access to Jacobian coordinates: one inversion per point */
        if (!EC_POINT_get_affine_coordinates(p->group, w->point[i], w->x[i], NULL, ctx))
            goto done;
#endif
    }
#ifndef OPENSSL_NO_DEPRECATED_3_0
    if (RAND_priv_bytes(w->rnd, 32) != 1 || !scalar_from(w->blind, w->rnd, p->field.m) ||
        !batch_inverse(&p->field, w->zz, count, w->ok_z, w->blind, w))
        goto done;
    for (size_t i = 0; i < count; i++) /* X (plain) * Z^-2 R * R^-1 = x (plain) */
        if (w->ok_z[i] &&
            !BN_mod_mul_montgomery(w->x[i], w->x[i], w->zz[i], p->field.mont, ctx))
            goto done;
#else
    memset(w->ok_z, 1, count);
#endif
    for (size_t i = 0; i < count; i++) {
        /* r = x mod n: x < p < 2n, so one subtraction at most (r is public: no need for
         * constant time). r = 0 (probability ~2^-256) drops the entry. */
        if (BN_cmp(w->x[i], p->n.m) >= 0 && !BN_sub(w->x[i], w->x[i], p->n.m)) goto done;
        if (BN_is_zero(w->x[i])) w->ok_z[i] = 0;
        if (!BN_to_montgomery(w->k[i], w->k[i], p->n.mont, ctx)) goto done;
    }
    if (RAND_priv_bytes(w->rnd, 32) != 1 || !scalar_from(w->blind, w->rnd, p->n.m) ||
        !batch_inverse(&p->n, w->k, count, w->ok_k, w->blind, w))
        goto done;
    made = 0;
    for (size_t i = 0; i < count; i++) {
        if (!w->ok_z[i] || !w->ok_k[i]) continue;
        uint8_t *e = w->out + made * DCC_POOL_ENTRY_SIZE;
        if (BN_bn2binpad(w->k[i], e, 32) != 32 || BN_bn2binpad(w->x[i], e + 32, 32) != 32) {
            made = (size_t)-1;
            goto done;
        }
        made++;
    }
done:
    clear_chunk(w, count, p->group);
    return made;
}

/* dcc_pool_refill with the caller's scratch (the refill thread keeps one for its life). */
static size_t refill_with(dcc_pool *p, refill_work *w, size_t max_new)
{
    size_t added = 0;
    int failed = 0;
    while (added < max_new) {
        pthread_mutex_lock(&p->lock);
        size_t room = p->capacity - p->level;
        pthread_mutex_unlock(&p->lock);
        size_t want = max_new - added;
        if (want > room) want = room;
        if (want > w->slots) want = w->slots;
        if (want == 0) break;
        size_t made = make_chunk(p, w, want);
        if (made == (size_t)-1 || made == 0) { /* 0: every r of a chunk was 0, i.e. broken */
            failed = 1;
            break;
        }
        size_t put = 0;
        pthread_mutex_lock(&p->lock);
        if (!orphaned(p)) {
            put = p->capacity - p->level; /* another thread may have refilled meanwhile */
            if (put > made) put = made;
            memcpy(p->mem + p->level * DCC_POOL_ENTRY_SIZE, w->out, put * DCC_POOL_ENTRY_SIZE);
            p->level += put;
            p->refilled += put;
        }
        pthread_mutex_unlock(&p->lock);
        OPENSSL_cleanse(w->out, made * DCC_POOL_ENTRY_SIZE);
        added += put;
        if (put < made) break;
    }
    if (failed) {
        ERR_clear_error();
        return added ? added : (size_t)-1;
    }
    return added;
}

size_t dcc_pool_refill(dcc_pool *p, size_t max_new)
{
    if (orphaned(p) || max_new == 0) return 0;
    refill_work *w = refill_work_new(p->group, max_new);
    if (w == NULL) return (size_t)-1;
    size_t added = refill_with(p, w, max_new);
    refill_work_free(w);
    return added;
}

int dcc_pool_batch_inverse(int field, const uint8_t *in, size_t count, uint8_t *out,
                           uint8_t *ok)
{
    int rc = -1;
    EC_GROUP *group = NULL;
    modulus n = {0}, fp = {0};
    refill_work *w = NULL;
    if (count == 0 || count > DCC_POOL_REFILL_CHUNK) return 0;
    w = refill_work_new(NULL, count);
    if (w == NULL || !p256_setup(&group, &n, &fp, w->ctx)) goto done;
    const modulus *md = field ? &fp : &n;
    for (size_t i = 0; i < count; i++) {
        if (BN_bin2bn(in + 32 * i, 32, w->k[i]) == NULL) goto done;
        if (BN_cmp(w->k[i], md->m) >= 0) {
            rc = 0;
            goto done;
        }
        if (!BN_to_montgomery(w->k[i], w->k[i], md->mont, w->ctx)) goto done;
    }
    if (RAND_priv_bytes(w->rnd, 32) != 1 || !scalar_from(w->blind, w->rnd, md->m) ||
        !batch_inverse(md, w->k, count, ok, w->blind, w))
        goto done;
    for (size_t i = 0; i < count; i++)
        if (!BN_from_montgomery(w->k[i], w->k[i], md->mont, w->ctx) ||
            BN_bn2binpad(w->k[i], out + 32 * i, 32) != 32)
            goto done;
    rc = 1;
done:
    if (rc < 0) ERR_clear_error();
    refill_work_free(w);
    modulus_free(&n);
    modulus_free(&fp);
    EC_GROUP_free(group);
    return rc;
}

static void *refill_main(void *arg)
{
    dcc_pool *p = arg;
#ifdef __linux__
    /* A name for per-thread CPU figures (/proc/PID/task/TID/comm, top -H). */
    pthread_setname_np(pthread_self(), "nonce-refill");
#endif
    pthread_mutex_lock(&p->lock); /* dcc_pool_start_refill has set the policy, or tried */
    if (p->refill_policy != DCC_REFILL_IDLE)
        p->refill_policy = setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19) == 0
                               ? DCC_REFILL_NICE
                               : DCC_REFILL_NORMAL;
    pthread_mutex_unlock(&p->lock);
    /* The thread's own scratch, for its whole life; without it (no memory), each chunk
     * allocates its own through dcc_pool_refill. */
    refill_work *w = refill_work_new(p->group, DCC_POOL_BACKGROUND_CHUNK);
    for (;;) {
        pthread_mutex_lock(&p->lock);
        /* Full, or a batch is signing: live signing has the cores (and the lock) first. */
        while (!p->stopping && (p->level == p->capacity || p->signing > 0)) {
            p->refill_waiting = 1;
            pthread_cond_wait(&p->room, &p->lock);
            p->refill_waiting = 0;
        }
        int stop = p->stopping;
        pthread_mutex_unlock(&p->lock);
        if (stop) break;
        size_t added = w != NULL ? refill_with(p, w, DCC_POOL_BACKGROUND_CHUNK)
                                 : dcc_pool_refill(p, DCC_POOL_BACKGROUND_CHUNK);
        if (added == (size_t)-1) {
            /* OpenSSL failed (the entropy source, most likely): try again in a while rather
             * than spin; signing falls back meanwhile. */
            struct timespec pause = {0, 100 * 1000 * 1000};
            nanosleep(&pause, NULL);
        }
    }
    refill_work_free(w);
    return NULL;
}

int dcc_pool_enter(dcc_pool *p)
{
    /* The pid check, once per batch: a batch runs on one thread, and a forked child holds
     * only the thread that called fork, so a batch entered here ends in this process. */
    if (orphaned(p)) return 0;
    pthread_mutex_lock(&p->lock);
    p->signing++;
    pthread_mutex_unlock(&p->lock);
    return 1;
}

void dcc_pool_leave(dcc_pool *p)
{
    pthread_mutex_lock(&p->lock);
    if (p->signing > 0 && --p->signing == 0 && p->refill_waiting)
        pthread_cond_signal(&p->room);
    pthread_mutex_unlock(&p->lock);
}

int dcc_pool_start_refill(dcc_pool *p)
{
    if (orphaned(p)) return ESRCH;
    if (p->thread_running) return EALREADY;
    struct sched_param param = {0};
    /* The thread starts under the lock, so it sees its policy settled: SCHED_IDLE if the
     * kernel allows it (it always does for lowering), else it tries nice 19 itself. */
    pthread_mutex_lock(&p->lock);
    int rc = pthread_create(&p->thread, NULL, refill_main, p);
    if (rc == 0) {
        p->thread_running = 1;
        p->refill_policy = pthread_setschedparam(p->thread, SCHED_IDLE, &param) == 0
                               ? DCC_REFILL_IDLE
                               : DCC_REFILL_NONE;
    }
    pthread_mutex_unlock(&p->lock);
    return rc;
}

dcc_pool_work *dcc_pool_work_new(void)
{
    dcc_pool_work *w = calloc(1, sizeof *w);
    if (w == NULL) return NULL;
    w->ctx = BN_CTX_secure_new();
    w->z = BN_new();
    w->r = BN_new();
    w->kinv = secret_bn_new();
    w->t = secret_bn_new();
    w->s = secret_bn_new();
    if (w->ctx == NULL || w->z == NULL || w->r == NULL || w->kinv == NULL || w->t == NULL ||
        w->s == NULL) {
        dcc_pool_work_free(w);
        return NULL;
    }
    return w;
}

void dcc_pool_work_free(dcc_pool_work *w)
{
    if (w == NULL) return;
    BN_clear_free(w->z);
    BN_clear_free(w->r);
    BN_clear_free(w->kinv);
    BN_clear_free(w->t);
    BN_clear_free(w->s);
    BN_CTX_free(w->ctx);
    free(w);
}

/* Takes the newest entry into out and wipes its slot; 0 when there is none. Only inside a
 * batch (dcc_pool_enter made the pid check: one getpid per batch, not per signature). */
static int take(dcc_pool *p, uint8_t out[DCC_POOL_ENTRY_SIZE])
{
    pthread_mutex_lock(&p->lock);
    if (p->level == 0) {
        p->misses++;
        pthread_mutex_unlock(&p->lock);
        return 0;
    }
    p->level--;
    if (p->refill_waiting) pthread_cond_signal(&p->room);
    uint8_t *slot = p->mem + p->level * DCC_POOL_ENTRY_SIZE;
    memcpy(out, slot, DCC_POOL_ENTRY_SIZE);
    OPENSSL_cleanse(slot, DCC_POOL_ENTRY_SIZE);
    p->spent++;
    pthread_mutex_unlock(&p->lock);
    return 1;
}

int dcc_pool_sign(dcc_pool *p, dcc_pool_work *w, const uint8_t digest[32], uint8_t sig[64])
{
    uint8_t entry[DCC_POOL_ENTRY_SIZE];
    int rc = -1;
    for (;;) {
        if (!take(p, entry)) return 0;
        /* z: the leftmost 256 bits of the digest (all of it for P-256), reduced mod n. */
        if (BN_bin2bn(digest, 32, w->z) == NULL) break;
        if (BN_cmp(w->z, p->n.m) >= 0 && !BN_sub(w->z, w->z, p->n.m)) break;
        if (BN_bin2bn(entry, 32, w->kinv) == NULL || BN_bin2bn(entry + 32, 32, w->r) == NULL)
            break;
        OPENSSL_cleanse(entry, sizeof entry);
        /* t = r d (Montgomery: r * dR * R^-1), t = t + z, s = t * kinvR * R^-1 = t / k. */
        if (!BN_mod_mul_montgomery(w->t, w->r, p->d_mont, p->n.mont, w->ctx)) break;
        if (!BN_mod_add_quick(w->t, w->t, w->z, p->n.m)) break;
        if (!BN_mod_mul_montgomery(w->s, w->t, w->kinv, p->n.mont, w->ctx)) break;
        if (BN_is_zero(w->s)) {
            /* s = 0 (probability ~2^-256): this entry cannot sign z; it is gone, take another. */
            pthread_mutex_lock(&p->lock);
            p->discarded++;
            pthread_mutex_unlock(&p->lock);
            continue;
        }
        /* low-S: (r, n - s) verifies as well; the upper half is never emitted. */
        if (BN_cmp(w->s, p->half_order) > 0 && !BN_sub(w->s, p->n.m, w->s)) break;
        if (BN_bn2binpad(w->r, sig, 32) != 32 || BN_bn2binpad(w->s, sig + 32, 32) != 32) break;
        rc = 1;
        break;
    }
    OPENSSL_cleanse(entry, sizeof entry);
    BN_clear(w->kinv);
    BN_clear(w->t);
    BN_clear(w->s);
    if (rc != 1) ERR_clear_error();
    return rc;
}

void dcc_pool_clear(dcc_pool *p)
{
    if (orphaned(p)) return;
    pthread_mutex_lock(&p->lock);
    OPENSSL_cleanse(p->mem, p->level * DCC_POOL_ENTRY_SIZE);
    p->discarded += p->level;
    p->level = 0;
    pthread_mutex_unlock(&p->lock);
}

void dcc_pool_info_get(dcc_pool *p, dcc_pool_info *info)
{
    int orphan = orphaned(p);
    if (!orphan) pthread_mutex_lock(&p->lock);
    info->capacity = p->capacity;
    info->level = p->level;
    info->refilled = p->refilled;
    info->spent = p->spent;
    info->misses = p->misses;
    info->discarded = p->discarded;
    info->locked = p->locked;
    info->dontdump = p->dontdump;
    info->wipeonfork = p->wipeonfork;
    info->lock_errno = p->lock_errno;
    info->orphaned = orphan;
    info->refill_policy = p->thread_running ? p->refill_policy : DCC_REFILL_NONE;
    if (!orphan) pthread_mutex_unlock(&p->lock);
}

size_t dcc_pool_residue(dcc_pool *p)
{
    size_t n = 0;
    int orphan = orphaned(p);
    if (!orphan) pthread_mutex_lock(&p->lock);
    for (size_t i = p->level * DCC_POOL_ENTRY_SIZE; i < p->map_len; i++)
        n += p->mem[i] != 0;
    if (!orphan) pthread_mutex_unlock(&p->lock);
    return n;
}
