/*
 * jobpool.h: worker threads that run C jobs without Python, and an eventfd to collect them.
 *
 * Why: the engine hands each frame's reply encoding (COSE, deflate, base45, the result CBOR)
 * off its event loop. A Python worker thread must take the GIL
 * to start the call and again to deliver it, and on a 2-core machine that GIL hand-over,
 * with the wake-ups around it, cost more CPU than the encoding itself saves the loop
 * (bench/README.md, "A native pool for the reply encoding"). These threads never touch
 * Python: a job is a C struct whose inputs the submitter keeps alive and does not change
 * until it is collected.
 *
 * Contract:
 * - dcc_jobpool_new starts `threads` (1..64) threads named `name` (at most 15 characters)
 *   and an eventfd (non-blocking, close-on-exec). NULL with *err = errno on failure, with
 *   nothing left behind.
 * - dcc_jobpool_submit queues a job (FIFO); a worker calls job->run(job) once.
 * - When a job has run it joins the done list, and the eventfd becomes readable if the list
 *   was empty. dcc_jobpool_collect empties the eventfd and returns the done list (oldest
 *   first, linked through `next`; NULL when empty). Thread-safe; never blocks on a job.
 * - dcc_jobpool_stop lets the queued jobs run and joins the threads (idempotent; submit no
 *   more after it); what they finished can still be collected.
 * - dcc_jobpool_free stops the pool, closes the eventfd and frees it. Jobs done and not
 *   collected are dropped from the list (not freed: the caller owns every job): stop and
 *   collect before freeing.
 */
#ifndef DCC_JOBPOOL_H
#define DCC_JOBPOOL_H

typedef struct dcc_job {
    void (*run)(struct dcc_job *job);
    struct dcc_job *next; /* the pool's, while queued or done */
    void *owner;          /* the submitter's */
} dcc_job;

typedef struct dcc_jobpool dcc_jobpool;

dcc_jobpool *dcc_jobpool_new(int threads, const char *name, int *err);
int dcc_jobpool_fd(const dcc_jobpool *pool);
void dcc_jobpool_submit(dcc_jobpool *pool, dcc_job *job);
dcc_job *dcc_jobpool_collect(dcc_jobpool *pool);
void dcc_jobpool_stop(dcc_jobpool *pool);
void dcc_jobpool_free(dcc_jobpool *pool);

#endif
