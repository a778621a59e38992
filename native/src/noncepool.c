/*
 * noncepool.c: see noncepool.h for the contracts and the rules.
 */
#define _GNU_SOURCE
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

/* 16 Mi entries (1 GiB): far beyond any burst, small enough that a typo is refused. */
#define POOL_MAX_ENTRIES ((size_t)1 << 24)

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
    BIGNUM *order, *order_minus_2, *half_order;
    BIGNUM *d_mont; /* the private scalar d * 2^256 mod n (Montgomery form) */
    BN_MONT_CTX *mont;
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
    void *mem = mmap(NULL, p->map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
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

    p->group = EC_GROUP_new_by_curve_name(NID_X9_62_prime256v1);
    if (p->group == NULL) goto ossl;
    p->order = BN_dup(EC_GROUP_get0_order(p->group));
    p->order_minus_2 = BN_dup(p->order);
    p->half_order = BN_new();
    p->d_mont = BN_new();
    p->mont = BN_MONT_CTX_new();
    if (p->order == NULL || p->order_minus_2 == NULL || p->half_order == NULL ||
        p->d_mont == NULL || p->mont == NULL)
        goto ossl;
    BN_set_flags(d, BN_FLG_CONSTTIME);
    BN_set_flags(p->d_mont, BN_FLG_CONSTTIME);
    if (!BN_sub_word(p->order_minus_2, 2) || !BN_rshift1(p->half_order, p->order) ||
        !BN_MONT_CTX_set(p->mont, p->order, ctx) ||
        !BN_to_montgomery(p->d_mont, d, p->mont, ctx))
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
    BN_free(p->order);
    BN_free(p->order_minus_2);
    BN_free(p->half_order);
    BN_MONT_CTX_free(p->mont);
    EC_GROUP_free(p->group);
    OPENSSL_cleanse(p, sizeof *p);
    free(p);
}

/* One entry from fresh randomness: r = x(kG) mod n (nonzero) and k^-1 in Montgomery form.
 * k is a secret like d: constant-time flags, a constant-time exponentiation for the inverse
 * (Fermat: k^(n-2) mod n), and OpenSSL's constant-time fixed-base multiplication for kG. */
static int make_entry(dcc_pool *p, BN_CTX *ctx, BIGNUM *k, BIGNUM *x, BIGNUM *r, BIGNUM *kinv,
                      EC_POINT *point, uint8_t out[DCC_POOL_ENTRY_SIZE])
{
    for (int attempt = 0; attempt < 16; attempt++) {
        do {
            if (!BN_priv_rand_range(k, p->order)) return 0;
        } while (BN_is_zero(k));
        BN_set_flags(k, BN_FLG_CONSTTIME);
        if (!EC_POINT_mul(p->group, point, k, NULL, NULL, ctx)) return 0;
        if (!EC_POINT_get_affine_coordinates(p->group, point, x, NULL, ctx)) return 0;
        if (!BN_nnmod(r, x, p->order, ctx)) return 0;
        if (BN_is_zero(r)) continue; /* probability ~2^-256; a fresh k */
        if (!BN_mod_exp_mont_consttime(kinv, k, p->order_minus_2, p->order, ctx, p->mont))
            return 0;
        if (!BN_to_montgomery(kinv, kinv, p->mont, ctx)) return 0;
        if (BN_bn2binpad(kinv, out, 32) != 32 || BN_bn2binpad(r, out + 32, 32) != 32) return 0;
        return 1;
    }
    return 0;
}

size_t dcc_pool_refill(dcc_pool *p, size_t max_new)
{
    uint8_t buf[DCC_POOL_REFILL_CHUNK * DCC_POOL_ENTRY_SIZE];
    size_t added = 0;
    int failed = 0;
    if (orphaned(p)) return 0;
    BN_CTX *ctx = BN_CTX_secure_new();
    BIGNUM *k = BN_secure_new(), *x = BN_new(), *r = BN_new(), *kinv = BN_secure_new();
    EC_POINT *point = EC_POINT_new(p->group);
    if (ctx == NULL || k == NULL || x == NULL || r == NULL || kinv == NULL || point == NULL) {
        failed = 1;
        goto done;
    }
    BN_set_flags(kinv, BN_FLG_CONSTTIME);
    while (added < max_new) {
        pthread_mutex_lock(&p->lock);
        size_t room = p->capacity - p->level;
        pthread_mutex_unlock(&p->lock);
        size_t want = max_new - added;
        if (want > room) want = room;
        if (want > DCC_POOL_REFILL_CHUNK) want = DCC_POOL_REFILL_CHUNK;
        if (want == 0) break;
        for (size_t i = 0; i < want; i++) {
            if (!make_entry(p, ctx, k, x, r, kinv, point, buf + i * DCC_POOL_ENTRY_SIZE)) {
                failed = 1;
                goto done;
            }
        }
        size_t put = 0;
        pthread_mutex_lock(&p->lock);
        if (!orphaned(p)) {
            put = p->capacity - p->level; /* another thread may have refilled meanwhile */
            if (put > want) put = want;
            memcpy(p->mem + p->level * DCC_POOL_ENTRY_SIZE, buf, put * DCC_POOL_ENTRY_SIZE);
            p->level += put;
            p->refilled += put;
        }
        pthread_mutex_unlock(&p->lock);
        OPENSSL_cleanse(buf, want * DCC_POOL_ENTRY_SIZE);
        added += put;
        if (put < want) break;
    }
done:
    OPENSSL_cleanse(buf, sizeof buf);
    EC_POINT_clear_free(point);
    BN_clear_free(k);
    BN_clear_free(kinv);
    BN_clear_free(x);
    BN_clear_free(r);
    BN_CTX_free(ctx);
    if (failed) {
        ERR_clear_error();
        return added ? added : (size_t)-1;
    }
    return added;
}

static void *refill_main(void *arg)
{
    dcc_pool *p = arg;
    pthread_mutex_lock(&p->lock); /* dcc_pool_start_refill has set the policy, or tried */
    if (p->refill_policy != DCC_REFILL_IDLE)
        p->refill_policy = setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19) == 0
                               ? DCC_REFILL_NICE
                               : DCC_REFILL_NORMAL;
    pthread_mutex_unlock(&p->lock);
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
        if (dcc_pool_refill(p, DCC_POOL_BACKGROUND_CHUNK) == (size_t)-1) {
            /* OpenSSL failed (the entropy source, most likely): try again in a while rather
             * than spin; signing falls back meanwhile. */
            struct timespec pause = {0, 100 * 1000 * 1000};
            nanosleep(&pause, NULL);
        }
    }
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
    w->kinv = BN_secure_new();
    w->t = BN_secure_new();
    w->s = BN_secure_new();
    if (w->ctx == NULL || w->z == NULL || w->r == NULL || w->kinv == NULL || w->t == NULL ||
        w->s == NULL) {
        dcc_pool_work_free(w);
        return NULL;
    }
    BN_set_flags(w->kinv, BN_FLG_CONSTTIME);
    BN_set_flags(w->t, BN_FLG_CONSTTIME);
    BN_set_flags(w->s, BN_FLG_CONSTTIME);
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
        if (BN_cmp(w->z, p->order) >= 0 && !BN_sub(w->z, w->z, p->order)) break;
        if (BN_bin2bn(entry, 32, w->kinv) == NULL || BN_bin2bn(entry + 32, 32, w->r) == NULL)
            break;
        OPENSSL_cleanse(entry, sizeof entry);
        /* t = r d (Montgomery: r * dR * R^-1), t = t + z, s = t * kinvR * R^-1 = t / k. */
        if (!BN_mod_mul_montgomery(w->t, w->r, p->d_mont, p->mont, w->ctx)) break;
        if (!BN_mod_add_quick(w->t, w->t, w->z, p->order)) break;
        if (!BN_mod_mul_montgomery(w->s, w->t, w->kinv, p->mont, w->ctx)) break;
        if (BN_is_zero(w->s)) {
            /* s = 0 (probability ~2^-256): this entry cannot sign z; it is gone, take another. */
            pthread_mutex_lock(&p->lock);
            p->discarded++;
            pthread_mutex_unlock(&p->lock);
            continue;
        }
        /* low-S: (r, n - s) verifies as well; the upper half is never emitted. */
        if (BN_cmp(w->s, p->half_order) > 0 && !BN_sub(w->s, p->order, w->s)) break;
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
