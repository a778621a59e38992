/*
 * jobpool.c: see jobpool.h for the contract.
 */
#define _GNU_SOURCE
#include "jobpool.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct dcc_jobpool {
    pthread_mutex_t lock;
    pthread_cond_t work;      /* a job was queued, or the pool is stopping */
    dcc_job *queue_head, *queue_tail;
    dcc_job *done_head, *done_tail;
    int stopping;
    int efd;
    int nthreads;
    char name[16];
    pthread_t threads[];
};

static void *worker_main(void *arg)
{
    dcc_jobpool *pool = arg;
    pthread_setname_np(pthread_self(), pool->name);
    pthread_mutex_lock(&pool->lock);
    for (;;) {
        while (pool->queue_head == NULL && !pool->stopping)
            pthread_cond_wait(&pool->work, &pool->lock);
        dcc_job *job = pool->queue_head;
        if (job == NULL)
            break; /* stopping, and nothing is left to run */
        pool->queue_head = job->next;
        if (pool->queue_head == NULL)
            pool->queue_tail = NULL;
        pthread_mutex_unlock(&pool->lock);

        job->next = NULL;
        job->run(job);

        pthread_mutex_lock(&pool->lock);
        int was_empty = pool->done_head == NULL;
        if (was_empty)
            pool->done_head = job;
        else
            pool->done_tail->next = job;
        pool->done_tail = job;
        if (was_empty) {
            /* One wake-up for however many jobs finish before the collector runs. A full
             * counter (EAGAIN) still leaves the fd readable, which is all that matters. */
            uint64_t one = 1;
            ssize_t w;
            do
                w = write(pool->efd, &one, sizeof one);
            while (w < 0 && errno == EINTR);
        }
    }
    pthread_mutex_unlock(&pool->lock);
    return NULL;
}

dcc_jobpool *dcc_jobpool_new(int threads, const char *name, int *err)
{
    if (threads < 1 || threads > 64 || name == NULL) {
        *err = EINVAL;
        return NULL;
    }
    dcc_jobpool *pool = calloc(1, sizeof *pool + (size_t)threads * sizeof(pthread_t));
    if (pool == NULL) {
        *err = ENOMEM;
        return NULL;
    }
    strncpy(pool->name, name, sizeof pool->name - 1);
    pool->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (pool->efd < 0) {
        *err = errno;
        free(pool);
        return NULL;
    }
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->work, NULL);
    for (int i = 0; i < threads; i++) {
        int rc = pthread_create(&pool->threads[i], NULL, worker_main, pool);
        if (rc != 0) {
            *err = rc;
            dcc_jobpool_free(pool); /* joins the ones started */
            return NULL;
        }
        pool->nthreads = i + 1;
    }
    return pool;
}

int dcc_jobpool_fd(const dcc_jobpool *pool)
{
    return pool->efd;
}

void dcc_jobpool_submit(dcc_jobpool *pool, dcc_job *job)
{
    job->next = NULL;
    pthread_mutex_lock(&pool->lock);
    if (pool->queue_tail == NULL)
        pool->queue_head = job;
    else
        pool->queue_tail->next = job;
    pool->queue_tail = job;
    pthread_cond_signal(&pool->work);
    pthread_mutex_unlock(&pool->lock);
}

dcc_job *dcc_jobpool_collect(dcc_jobpool *pool)
{
    uint64_t count;
    pthread_mutex_lock(&pool->lock);
    /* Emptied under the lock: a job that finishes after this read finds the list empty
     * and writes again, so no finished job is ever left without a readable fd. */
    ssize_t r;
    do
        r = read(pool->efd, &count, sizeof count);
    while (r < 0 && errno == EINTR);
    dcc_job *done = pool->done_head;
    pool->done_head = pool->done_tail = NULL;
    pthread_mutex_unlock(&pool->lock);
    return done;
}

void dcc_jobpool_stop(dcc_jobpool *pool)
{
    pthread_mutex_lock(&pool->lock);
    pool->stopping = 1;
    pthread_cond_broadcast(&pool->work);
    pthread_mutex_unlock(&pool->lock);
    for (int i = 0; i < pool->nthreads; i++)
        pthread_join(pool->threads[i], NULL);
    pool->nthreads = 0;
}

void dcc_jobpool_free(dcc_jobpool *pool)
{
    if (pool == NULL)
        return;
    dcc_jobpool_stop(pool);
    pthread_cond_destroy(&pool->work);
    pthread_mutex_destroy(&pool->lock);
    close(pool->efd);
    free(pool);
}
