/* The raw engine's epoll set and relay pump, compiled: the per-event work of an established
 * connection without the interpreter.
 *
 * Why C here and nowhere else: after issue 12's two rounds of syscall work, what separated the
 * engine from HAProxy and nginx per short connection and per keep-alive request was Python
 * itself (~170 interpreted calls per connection; a keep-alive request is two readiness events,
 * each a dispatch loop step, a bound-method call, a dozen attribute updates and two socket
 * method calls). This module does exactly what `epollset.EpollSet` and `splice.SplicePump` do,
 * with the same interface and the same decisions (documented there, not repeated here), and the
 * pure-Python classes stay as the fallback where the module was not built.
 *
 * `EpollSet` is the loop's add_reader/add_writer interface on an engine-owned epoll set; its
 * watches live in a table indexed by descriptor. A `Pump` registers its descriptors there
 * natively: their readiness events run the relay in C and only the end of the relay (or a pipe
 * from the Python `PipePool`) calls back into Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* glibc makes recv, send, splice, epoll_wait and their kin cancellation points: once the process
 * has had a second thread (watchfiles' config watcher, asyncio's resolver pool), every such call
 * is bracketed by two more that switch asynchronous cancellation on and off, about 1 % of the
 * proxy's CPU under keep-alive load (`perf record`). Nothing here is ever cancelled, so the relay
 * makes these system calls itself. */
static inline ssize_t
sys_recv(int fd, void *buf, size_t len, int flags)
{
    return syscall(SYS_recvfrom, (long)fd, buf, len, (long)flags, NULL, NULL);
}

static inline ssize_t
sys_sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *to, socklen_t tolen)
{
    return syscall(SYS_sendto, (long)fd, buf, len, (long)flags, to, (long)tolen);
}

static inline ssize_t
sys_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    return syscall(SYS_sendmsg, (long)fd, msg, (long)flags);
}

static inline int
sys_recvmmsg(int fd, struct mmsghdr *msgs, unsigned int n, int flags)
{
    return (int)syscall(SYS_recvmmsg, (long)fd, msgs, (long)n, (long)flags, NULL);
}

static inline int
sys_sendmmsg(int fd, struct mmsghdr *msgs, unsigned int n, int flags)
{
    return (int)syscall(SYS_sendmmsg, (long)fd, msgs, (long)n, (long)flags);
}

static inline ssize_t
sys_splice(int in, int out, size_t len, unsigned int flags)
{
    return syscall(SYS_splice, (long)in, NULL, (long)out, NULL, len, (long)flags);
}

static inline int
sys_epoll_wait(int epfd, struct epoll_event *events, int max, int timeout)
{
#ifdef SYS_epoll_wait
    return (int)syscall(SYS_epoll_wait, (long)epfd, events, (long)max, (long)timeout);
#else /* (arm64 has only epoll_pwait; no mask is epoll_wait) */
    return (int)syscall(SYS_epoll_pwait, (long)epfd, events, (long)max, (long)timeout, NULL, 0L);
#endif
}

static inline int
sys_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    return (int)syscall(SYS_accept4, (long)fd, addr, len, (long)flags);
}

static inline int
sys_connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    return (int)syscall(SYS_connect, (long)fd, addr, (long)len);
}

#define SMALL_READ 16384
#define ROUNDS_PER_WAKEUP 8
#define MAX_EVENTS 512

#define EV_IN (EPOLLIN | EPOLLRDHUP)
#define EV_OUT (EPOLLOUT)
#define EV_ERR (EPOLLERR | EPOLLHUP)
#define EV_READ (EV_IN | EV_ERR)
#define EV_WRITE (EV_OUT | EV_ERR)
/* A pump's sockets (and a dial's, from its first epoll_ctl) are registered once, edge-triggered:
 * pausing a direction, resuming it or reaching EOF then costs no epoll_ctl, and closing removes
 * them. Two epoll_ctl per proxied connection, as nginx, against four when each interest change
 * was a MOD and an EOF socket (readable for ever, level-triggered) a DEL. Writability is asked
 * for only where it is needed (a dial's connect, a receiver that once fell behind): an accepted
 * socket registered for it would report "writable" at once, a wake-up for nothing. */
#define EV_EDGE (EV_IN | EPOLLET)
#define EV_EDGE_OUT (EV_IN | EV_OUT | EPOLLET)

#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)

/* Results of a read step besides a byte count. */
#define STEP_AGAIN (-2)
#define STEP_ERROR (-1)

/* Names looked up on every connection, made once (a C string would be decoded on each call). */
static PyObject *str_fileno, *str_close, *str_pipe_size, *str_acquire;

typedef struct Pump Pump;
typedef struct Lane Lane;
typedef struct Inlet Inlet;

/* One descriptor: Python callbacks (the loop interface), or a pump's or a UDP lane's native
 * interest, or both for the moment a dial's writer hands the target socket over to its pump. */
typedef struct {
    PyObject *reader, *reader_args, *writer, *writer_args;
    Pump *pump;            /* borrowed: a pump (or, when `lane`, a Lane) unhooks itself before it goes */
    uint32_t armed;        /* the mask the kernel has; 0: not added */
    uint64_t gone_epoch;   /* forgotten during this batch: skip its remaining events */
    uint8_t used, dirty, native_read, native_write, lane;
    uint8_t et; /* owned by a pump or a dial: 1 registered EV_EDGE, 2 EV_EDGE_OUT */
} Watch;

/* A pump direction that ran out of rounds with bytes perhaps still queued (see core_retry). */
typedef struct {
    Pump *pump;
    int index;
} Retry;

typedef struct {
    PyObject_HEAD
    int epfd;
    PyObject *loop;
    PyObject *dispatch_cb; /* self.dispatch, for loop.call_soon when retries are due */
    Retry *retry;
    int nretry, capretry, retry_armed;
    Watch *watches;
    int nwatches;
    int *dirty;
    int ndirty, capdirty;
    int dispatching;
    uint64_t epoch;
    unsigned int ready_events;
    char *scratch;
    char *dgram;    /* LANE_VLEN whole datagrams, for UDP lanes (allocated with the first) */
    char *dgram_in; /* the same for UDP inlets: a reader of one may call Python, never the other */
    PyObject *weakreflist;
} Core;

typedef struct {
    int src, dst;
    int eof, finished;
    Py_ssize_t pending;
    long long moved;
    PyObject *pipe; /* (read_fd, write_fd) from the pool while spliced bytes are in flight */
    int pipe_r, pipe_w;
    char *tail;
    Py_ssize_t tail_off, tail_len;
    Py_ssize_t chunk;
    int spliced; /* a read filled the copy buffer once: bulk, spliced from then on */
} Dir;

struct Pump {
    PyObject_HEAD
    Core *core;
    PyObject *a, *b; /* the socket objects: kept alive while the pump uses their descriptors */
    PyObject *on_done;
    PyObject *pool;
    Py_ssize_t pipe_chunk;
    Dir d[2];
    char closed;
    int failed_side;
    char shutdown_last;
    char half_close; /* 0: the first direction to finish ends both (nginx's proxy_half_close off) */
    int hooked; /* registered natively in core: must unhook before it goes */
    long long reads; /* read calls on either source: lets tests prove the pump does not spin */
    PyObject *on_dialed; /* while `dialing`: told how the dial to b ended (see pump_dial) */
    char dialing, read_first, notify, launched;
};

static PyTypeObject CoreType;
static PyTypeObject PumpType;

/* ---- the epoll set ------------------------------------------------------------------------ */

static int
core_grow(Core *c, int fd)
{
    if (fd < c->nwatches)
        return 0;
    int n = c->nwatches ? c->nwatches : 1024;
    while (n <= fd)
        n *= 2;
    Watch *w = PyMem_Realloc(c->watches, (size_t)n * sizeof(Watch));
    if (w == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(w + c->nwatches, 0, (size_t)(n - c->nwatches) * sizeof(Watch));
    c->watches = w;
    c->nwatches = n;
    return 0;
}

static void
watch_clear_python(Watch *w)
{
    Py_CLEAR(w->reader);
    Py_CLEAR(w->reader_args);
    Py_CLEAR(w->writer);
    Py_CLEAR(w->writer_args);
}

/* Bring the kernel's mask for fd in line with its interest: one epoll_ctl at most.
 * Returns -1 with errno set when epoll_ctl failed. */
static int
core_apply(Core *c, int fd)
{
    Watch *w = &c->watches[fd];
    uint32_t want = w->et == 2 ? EV_EDGE_OUT
                    : w->et    ? EV_EDGE
                               : ((w->reader || w->native_read) ? EV_IN : 0) |
                                     ((w->writer || w->native_write) ? EV_OUT : 0);
    uint32_t have = w->armed;
    struct epoll_event ev;
    if (want == 0) {
        w->used = 0;
        w->pump = NULL;
        w->lane = 0;
        /* Edge-triggered, it stays silent without interest: no DEL (closing removes it). */
        if (have && !(have & EPOLLET)) {
            w->armed = 0;
            epoll_ctl(c->epfd, EPOLL_CTL_DEL, fd, NULL); /* already closed: the kernel dropped it */
        }
        return 0;
    }
    if (want == have)
        return 0;
    memset(&ev, 0, sizeof(ev));
    ev.events = want;
    ev.data.fd = fd;
    if (have == 0) {
        if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            /* forgotten but not closed (yet): take it over */
            if (errno != EEXIST || epoll_ctl(c->epfd, EPOLL_CTL_MOD, fd, &ev) < 0)
                return -1;
        }
    }
    else if (epoll_ctl(c->epfd, EPOLL_CTL_MOD, fd, &ev) < 0) {
        /* closed without forget and the number reused: add it again */
        if (errno != ENOENT || epoll_ctl(c->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            return -1;
    }
    w->armed = want;
    return 0;
}

/* Interest in fd changed: applied now, or after the batch being dispatched.
 * Returns -1 with an OSError set when applying now failed. */
static int
core_changed(Core *c, int fd)
{
    Watch *w = &c->watches[fd];
    if (c->dispatching) {
        if (!w->dirty) {
            if (c->ndirty == c->capdirty) {
                int cap = c->capdirty ? c->capdirty * 2 : 256;
                int *d = PyMem_Realloc(c->dirty, (size_t)cap * sizeof(int));
                if (d == NULL) {
                    PyErr_NoMemory();
                    return -1;
                }
                c->dirty = d;
                c->capdirty = cap;
            }
            c->dirty[c->ndirty++] = fd;
            w->dirty = 1;
        }
        return 0;
    }
    if (core_apply(c, fd) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* Come back to this pump direction on the next dispatch (scheduled with call_soon). */
static int
core_retry(Core *c, Pump *p, int index)
{
    if (c->nretry == c->capretry) {
        int cap = c->capretry ? c->capretry * 2 : 64;
        Retry *r = PyMem_Realloc(c->retry, (size_t)cap * sizeof(Retry));
        if (r == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        c->retry = r;
        c->capretry = cap;
    }
    Py_INCREF(p);
    c->retry[c->nretry].pump = p;
    c->retry[c->nretry].index = index;
    c->nretry++;
    return 0;
}

static void
core_drop_retries(Core *c)
{
    int n = c->nretry;
    Retry *list = c->retry;
    c->retry = NULL;
    c->nretry = c->capretry = 0;
    for (int i = 0; i < n; i++)
        Py_DECREF(list[i].pump);
    PyMem_Free(list);
}

static int
check_fd(Core *c, int fd)
{
    if (fd < 0) {
        PyErr_Format(PyExc_ValueError, "invalid file descriptor %d", fd);
        return -1;
    }
    if (c->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "I/O operation on closed epoll set");
        return -1;
    }
    return core_grow(c, fd);
}

static int pump_fail_errno(Pump *p, Dir *d, int writing, int err);
static int lane_report_errno(Lane *l, int err);
static int inlet_report_errno(Inlet *in, int err);

/* After a batch: apply the interest changes it made. A descriptor the kernel refuses (closed by
 * a bug, or out of watches) is reported ready, so its owner's next syscall fails and tears the
 * connection down instead of leaving it unwatched forever. */
static int
core_flush(Core *c)
{
    int result = 0;
    for (int i = 0; i < c->ndirty; i++) {
        int fd = c->dirty[i];
        Watch *w = &c->watches[fd];
        if (!w->dirty)
            continue;
        w->dirty = 0;
        if (!w->used || core_apply(c, fd) == 0)
            continue;
        int err = errno;
        Pump *pump = w->pump;
        int is_lane = w->lane;
        PyObject *cb = w->reader ? w->reader : w->writer;
        PyObject *args = w->reader ? w->reader_args : w->writer_args;
        if (cb != NULL) {
            /* loop.call_soon(cb, *args) */
            Py_ssize_t nargs = args != NULL ? PyTuple_GET_SIZE(args) : 0;
            PyObject *full = PyTuple_New(nargs + 1);
            PyObject *meth = full ? PyObject_GetAttrString(c->loop, "call_soon") : NULL;
            PyObject *r = NULL;
            if (meth != NULL) {
                Py_INCREF(cb);
                PyTuple_SET_ITEM(full, 0, cb);
                for (Py_ssize_t k = 0; k < nargs; k++) {
                    PyObject *a = PyTuple_GET_ITEM(args, k);
                    Py_INCREF(a);
                    PyTuple_SET_ITEM(full, k + 1, a);
                }
                r = PyObject_Call(meth, full, NULL);
            }
            Py_XDECREF(meth);
            Py_XDECREF(full);
            if (r == NULL)
                result = -1;
            Py_XDECREF(r);
        }
        w = &c->watches[fd];
        watch_clear_python(w);
        w->used = 0;
        w->native_read = w->native_write = w->lane = 0;
        w->pump = NULL;
        w->armed = 0;
        if (pump != NULL && result == 0) {
            if ((is_lane == 2   ? inlet_report_errno((Inlet *)pump, err)
                 : is_lane ? lane_report_errno((Lane *)pump, err)
                           : pump_fail_errno(pump, NULL, 0, err)) < 0)
                result = -1;
        }
        if (result < 0)
            break;
    }
    /* Entries after a failure keep their dirty flag cleared lazily: reset them all. */
    for (int i = 0; i < c->ndirty; i++) {
        int fd = c->dirty[i];
        if (fd < c->nwatches && c->watches[fd].dirty) {
            c->watches[fd].dirty = 0;
            if (c->watches[fd].used && core_apply(c, fd) < 0) {
                /* leave it; its owner's next syscall will fail */
            }
        }
    }
    c->ndirty = 0;
    return result;
}

static int pump_on_readable(Pump *p, Dir *d, int unprompted);
static int pump_on_writable(Pump *p, Dir *d);
static int lane_on_readable(Lane *l);
static int inlet_on_readable(Inlet *in);

static PyObject *
core_dispatch(Core *c, PyObject *Py_UNUSED(ignored))
{
    struct epoll_event events[MAX_EVENTS];
    if (c->epfd < 0)
        Py_RETURN_NONE;
    int n = sys_epoll_wait(c->epfd, events, MAX_EVENTS, 0);
    if (n < 0) {
        if (errno == EINTR)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    uint64_t epoch = ++c->epoch;
    int failed = 0;
    c->dispatching = 1;
    c->retry_armed = 0;
    if (c->nretry) {
        /* Directions that ran out of rounds last time, before the new events. */
        int nr = c->nretry;
        Retry *list = c->retry;
        c->retry = NULL;
        c->nretry = c->capretry = 0;
        for (int i = 0; i < nr; i++) {
            Pump *p = list[i].pump;
            Dir *d = &p->d[list[i].index];
            if (!failed && !p->closed && !d->eof && d->src < c->nwatches &&
                c->watches[d->src].pump == p && c->watches[d->src].native_read)
                failed = pump_on_readable(p, d, 1) < 0;
            Py_DECREF(p);
        }
        PyMem_Free(list);
    }
    for (int i = 0; i < n && !failed; i++) {
        int fd = events[i].data.fd;
        uint32_t ev = events[i].events;
        if (fd >= c->nwatches)
            continue;
        Watch *w = &c->watches[fd];
        if (!w->used || w->gone_epoch == epoch)
            continue;
        c->ready_events = ev;
        int read_done = 0;
        if (ev & EV_READ) {
            read_done = w->native_read || w->reader != NULL;
            if (w->native_read && w->lane == 2) {
                Inlet *in = (Inlet *)w->pump;
                Py_INCREF(in);
                failed = inlet_on_readable(in) < 0;
                Py_DECREF(in);
            }
            else if (w->native_read && w->lane) {
                Lane *l = (Lane *)w->pump;
                Py_INCREF(l);
                failed = lane_on_readable(l) < 0;
                Py_DECREF(l);
            }
            else if (w->native_read) {
                Pump *p = w->pump;
                Py_INCREF(p);
                failed = pump_on_readable(p, fd == p->d[0].src ? &p->d[0] : &p->d[1], 0) < 0;
                Py_DECREF(p);
            }
            else if (w->reader != NULL) {
                PyObject *cb = w->reader, *args = w->reader_args;
                Py_INCREF(cb);
                Py_INCREF(args);
                PyObject *r = PyObject_Call(cb, args, NULL);
                Py_DECREF(cb);
                Py_DECREF(args);
                if (r == NULL)
                    failed = 1;
                Py_XDECREF(r);
            }
            if (failed)
                break;
            w = &c->watches[fd]; /* the table may have grown */
            if (!w->used || w->gone_epoch == epoch)
                continue;
        }
        if (ev & EV_WRITE) {
            if (w->native_write) {
                Pump *p = w->pump;
                Py_INCREF(p);
                failed = pump_on_writable(p, fd == p->d[0].dst ? &p->d[0] : &p->d[1]) < 0;
                Py_DECREF(p);
            }
            else if (w->writer != NULL) {
                PyObject *cb = w->writer, *args = w->writer_args;
                Py_INCREF(cb);
                Py_INCREF(args);
                PyObject *r = PyObject_Call(cb, args, NULL);
                Py_DECREF(cb);
                Py_DECREF(args);
                if (r == NULL)
                    failed = 1;
                Py_XDECREF(r);
                w = &c->watches[fd];
                if (!failed && !read_done && (ev & EV_READ) && w->used && w->gone_epoch != epoch &&
                    w->native_read && !w->lane) {
                    /* A pump took the socket over in that callback (a dial's connect): the bytes
                     * that came with this edge are its to read, no new edge will announce them. */
                    Pump *p = w->pump;
                    Py_INCREF(p);
                    failed = pump_on_readable(p, fd == p->d[0].src ? &p->d[0] : &p->d[1], 0) < 0;
                    Py_DECREF(p);
                }
            }
        }
    }
    c->dispatching = 0;
    c->ready_events = EV_ERR;
    if (c->nretry && !c->retry_armed && c->dispatch_cb != NULL) {
        PyObject *et = NULL, *evv = NULL, *tb = NULL;
        if (failed)
            PyErr_Fetch(&et, &evv, &tb);
        PyObject *r = PyObject_CallMethod(c->loop, "call_soon", "O", c->dispatch_cb);
        if (r == NULL) {
            if (failed)
                PyErr_WriteUnraisable((PyObject *)c);
            else
                failed = 1;
        }
        else {
            c->retry_armed = 1;
            Py_DECREF(r);
        }
        if (et != NULL || evv != NULL || tb != NULL)
            PyErr_Restore(et, evv, tb);
    }
    if (c->ndirty) {
        PyObject *et = NULL, *evv = NULL, *tb = NULL;
        if (failed)
            PyErr_Fetch(&et, &evv, &tb);
        if (core_flush(c) < 0) {
            if (failed)
                PyErr_WriteUnraisable((PyObject *)c);
            else
                failed = 1;
        }
        if (et != NULL || evv != NULL || tb != NULL)
            PyErr_Restore(et, evv, tb);
    }
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

static int
parse_fd(PyObject *arg, int *fd)
{
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "invalid file descriptor %ld", v);
        return -1;
    }
    *fd = (int)v;
    return 0;
}

static PyObject *
core_add(Core *c, PyObject *const *args, Py_ssize_t nargs, int writer, int edge)
{
    int fd;
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "expected fd, callback, *args");
        return NULL;
    }
    if (parse_fd(args[0], &fd) < 0 || check_fd(c, fd) < 0)
        return NULL;
    PyObject *cbargs = PyTuple_New(nargs - 2);
    if (cbargs == NULL)
        return NULL;
    for (Py_ssize_t i = 2; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(cbargs, i - 2, args[i]);
    }
    Watch *w = &c->watches[fd];
    PyObject *old_cb, *old_args;
    Py_INCREF(args[1]);
    if (writer) {
        old_cb = w->writer;
        old_args = w->writer_args;
        w->writer = args[1];
        w->writer_args = cbargs;
    }
    else {
        old_cb = w->reader;
        old_args = w->reader_args;
        w->reader = args[1];
        w->reader_args = cbargs;
    }
    w->used = 1;
    if (edge)
        w->et = 2;
    int rc = core_changed(c, fd);
    Py_XDECREF(old_cb);
    Py_XDECREF(old_args);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
core_add_reader(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    return core_add(c, args, nargs, 0, 0);
}

static PyObject *
core_add_writer(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    return core_add(c, args, nargs, 1, 0);
}

/* add_writer for a socket being connected that a pump will take over: registered EV_EDGE at
 * once, so the pump's start changes nothing in the kernel. */
static PyObject *
core_add_connecting(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    return core_add(c, args, nargs, 1, 1);
}

/* 1: removed, 0: there was no such callback, -1: error set. */
static int
core_remove_fd(Core *c, int fd, int writer)
{
    if (fd >= c->nwatches || c->epfd < 0)
        return 0;
    Watch *w = &c->watches[fd];
    PyObject *cb = writer ? w->writer : w->reader;
    if (!w->used || cb == NULL)
        return 0;
    PyObject *cbargs;
    if (writer) {
        cbargs = w->writer_args;
        w->writer = w->writer_args = NULL;
        if (w->pump == NULL)
            w->et = 0; /* the dial is over and no pump took the socket */
    }
    else {
        cbargs = w->reader_args;
        w->reader = w->reader_args = NULL;
    }
    int rc = core_changed(c, fd);
    Py_DECREF(cb);
    Py_XDECREF(cbargs);
    return rc < 0 ? -1 : 1;
}

static PyObject *
core_remove(Core *c, PyObject *arg, int writer)
{
    int fd;
    if (parse_fd(arg, &fd) < 0)
        return NULL;
    int rc = core_remove_fd(c, fd, writer);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

static PyObject *
core_remove_reader(Core *c, PyObject *arg)
{
    return core_remove(c, arg, 0);
}

static PyObject *
core_remove_writer(Core *c, PyObject *arg)
{
    return core_remove(c, arg, 1);
}

/* Drop fd from the set before it is closed (its number may be reused at once). */
static void
core_forget_fd(Core *c, int fd)
{
    if (fd < 0 || fd >= c->nwatches)
        return;
    Watch *w = &c->watches[fd];
    if (!w->used) {
        /* No interest left, but an edge-triggered registration stays until the close that
         * follows: the next socket with this number must be added afresh. */
        w->armed = 0;
        w->et = 0;
        w->dirty = 0;
        if (c->dispatching)
            w->gone_epoch = c->epoch; /* its events in this batch belong to the old socket */
        return;
    }
    PyObject *r = w->reader, *ra = w->reader_args, *wr = w->writer, *wa = w->writer_args;
    w->reader = w->reader_args = w->writer = w->writer_args = NULL;
    w->used = 0;
    w->dirty = 0;
    w->armed = 0;
    w->native_read = w->native_write = w->lane = w->et = 0;
    w->pump = NULL;
    if (c->dispatching)
        w->gone_epoch = c->epoch;
    Py_XDECREF(r);
    Py_XDECREF(ra);
    Py_XDECREF(wr);
    Py_XDECREF(wa);
}

static PyObject *
core_forget(Core *c, PyObject *arg)
{
    int fd;
    if (parse_fd(arg, &fd) < 0)
        return NULL;
    core_forget_fd(c, fd);
    Py_RETURN_NONE;
}

static void lane_unhooked(Lane *l);
static void inlet_unhooked(Inlet *in);

static void
core_release_all(Core *c)
{
    for (int fd = 0; fd < c->nwatches; fd++) {
        Watch *w = &c->watches[fd];
        watch_clear_python(w);
        if (w->pump != NULL && w->lane == 2)
            inlet_unhooked((Inlet *)w->pump);
        else if (w->pump != NULL && w->lane)
            lane_unhooked((Lane *)w->pump);
        else if (w->pump != NULL)
            w->pump->hooked = 0;
        w->pump = NULL;
        w->used = w->dirty = w->native_read = w->native_write = w->lane = w->et = 0;
        w->armed = 0;
    }
    c->ndirty = 0;
}

static PyObject *
core_close(Core *c, PyObject *Py_UNUSED(ignored))
{
    if (c->epfd < 0)
        Py_RETURN_NONE;
    if (c->loop != NULL) {
        PyObject *r = PyObject_CallMethod(c->loop, "remove_reader", "i", c->epfd);
        if (r == NULL)
            PyErr_Clear(); /* the loop is already closed */
        Py_XDECREF(r);
    }
    close(c->epfd);
    c->epfd = -1;
    core_release_all(c);
    core_drop_retries(c);
    Py_CLEAR(c->dispatch_cb);
    Py_RETURN_NONE;
}

static PyObject *
core_fileno(Core *c, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(c->epfd);
}

static PyObject *
core_get_closed(Core *c, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(c->epfd < 0);
}

static PyObject *
core_watching(Core *c, PyObject *arg)
{
    int fd;
    if (parse_fd(arg, &fd) < 0)
        return NULL;
    return PyBool_FromLong(fd < c->nwatches && c->watches[fd].used);
}

static PyObject *
core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"loop", NULL};
    PyObject *loop;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &loop))
        return NULL;
    Core *c = (Core *)type->tp_alloc(type, 0);
    if (c == NULL)
        return NULL;
    c->epfd = -1;
    c->ready_events = EV_ERR;
    c->scratch = PyMem_Malloc(SMALL_READ);
    if (c->scratch == NULL) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    c->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (c->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(c);
        return NULL;
    }
    Py_INCREF(loop);
    c->loop = loop;
    PyObject *dispatch = PyObject_GetAttrString((PyObject *)c, "dispatch");
    PyObject *r = dispatch ? PyObject_CallMethod(loop, "add_reader", "iO", c->epfd, dispatch) : NULL;
    c->dispatch_cb = dispatch;
    if (r == NULL) {
        close(c->epfd);
        c->epfd = -1;
        Py_DECREF(c);
        return NULL;
    }
    Py_DECREF(r);
    return (PyObject *)c;
}

static int
core_traverse(Core *c, visitproc visit, void *arg)
{
    Py_VISIT(c->loop);
    Py_VISIT(c->dispatch_cb);
    for (int i = 0; i < c->nretry; i++)
        Py_VISIT(c->retry[i].pump);
    for (int fd = 0; fd < c->nwatches; fd++) {
        Watch *w = &c->watches[fd];
        Py_VISIT(w->reader);
        Py_VISIT(w->reader_args);
        Py_VISIT(w->writer);
        Py_VISIT(w->writer_args);
    }
    return 0;
}

static int
core_clear(Core *c)
{
    for (int fd = 0; fd < c->nwatches; fd++)
        watch_clear_python(&c->watches[fd]);
    core_drop_retries(c);
    Py_CLEAR(c->dispatch_cb);
    Py_CLEAR(c->loop);
    return 0;
}

static void
core_dealloc(Core *c)
{
    PyObject_GC_UnTrack(c);
    if (c->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)c);
    if (c->epfd >= 0)
        close(c->epfd);
    c->epfd = -1;
    core_release_all(c);
    core_clear(c);
    PyMem_Free(c->watches);
    PyMem_Free(c->dirty);
    PyMem_Free(c->scratch);
    PyMem_Free(c->dgram);
    PyMem_Free(c->dgram_in);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef core_methods[] = {
    {"add_reader", (PyCFunction)(void (*)(void))core_add_reader, METH_FASTCALL,
     "add_reader(fd, callback, *args): call back when fd is readable."},
    {"add_writer", (PyCFunction)(void (*)(void))core_add_writer, METH_FASTCALL,
     "add_writer(fd, callback, *args): call back when fd is writable."},
    {"add_connecting", (PyCFunction)(void (*)(void))core_add_connecting, METH_FASTCALL,
     "add_connecting(fd, callback, *args): add_writer for a dial whose socket a Pump takes over."},
    {"remove_reader", (PyCFunction)core_remove_reader, METH_O, "Stop the reader; False if none."},
    {"remove_writer", (PyCFunction)core_remove_writer, METH_O, "Stop the writer; False if none."},
    {"forget", (PyCFunction)core_forget, METH_O,
     "The descriptor is about to be closed: drop it without a syscall."},
    {"dispatch", (PyCFunction)core_dispatch, METH_NOARGS, "Run the callbacks of ready descriptors."},
    {"close", (PyCFunction)core_close, METH_NOARGS, "Stop watching the set and close it."},
    {"fileno", (PyCFunction)core_fileno, METH_NOARGS, "The epoll descriptor."},
    {"watching", (PyCFunction)core_watching, METH_O, "True while fd has any interest."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef core_members[] = {
    {"ready_events", T_UINT, offsetof(Core, ready_events), READONLY,
     "Events of the descriptor whose callback runs; EPOLL_FAILED outside a batch."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef core_getset[] = {
    {"closed", (getter)core_get_closed, NULL, "True once closed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "portway.stream._fastpath.EpollSet",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The loop's add_reader/add_writer interface on an engine-owned epoll set (C).",
    .tp_new = core_new,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_methods = core_methods,
    .tp_members = core_members,
    .tp_getset = core_getset,
    .tp_weaklistoffset = offsetof(Core, weakreflist),
};

/* ---- the pump ----------------------------------------------------------------------------- */

/* Native interest of pump p in fd (reading its source, or writing its destination). */
static int
pump_watch(Pump *p, int fd, int writing, int on)
{
    Core *c = p->core;
    if (on && check_fd(c, fd) < 0)
        return -1;
    if (fd >= c->nwatches)
        return 0;
    Watch *w = &c->watches[fd];
    if (!on && (w->pump != p || w->lane))
        return 0; /* forgotten meanwhile */
    if (writing)
        w->native_write = (uint8_t)on;
    else
        w->native_read = (uint8_t)on;
    if (on) {
        w->pump = p;
        w->lane = 0;
        if (writing)
            w->et = 2; /* kept from now on: no MOD back and forth under backpressure */
        else if (!w->et)
            w->et = 1;
        w->used = 1;
        p->hooked = 1;
    }
    return core_changed(c, fd);
}

/* Removal never fails the caller: a descriptor the kernel no longer has is not watched. */
static void
pump_unwatch(Pump *p, int fd, int writing)
{
    if (pump_watch(p, fd, writing, 0) < 0)
        PyErr_Clear();
}

/* The pump lets go of its sockets (done, failed or closed): no interest, no owner. An
 * edge-triggered registration stays in the kernel until the caller closes the socket. */
static void
pump_release_fds(Pump *p)
{
    Core *c = p->core;
    if (p->hooked && c != NULL) {
        int fds[2] = {p->d[0].src, p->d[0].dst};
        for (int i = 0; i < 2; i++) {
            int fd = fds[i];
            if (fd >= c->nwatches)
                continue;
            Watch *w = &c->watches[fd];
            if (w->pump != p || w->lane)
                continue; /* forgotten meanwhile */
            w->native_read = w->native_write = w->et = 0;
            w->pump = NULL;
            if (core_changed(c, fd) < 0)
                PyErr_Clear();
        }
    }
    p->hooked = 0;
}

static int
pump_release_pipe(Pump *p, Dir *d, const char *how)
{
    PyObject *pipe = d->pipe;
    d->pipe = NULL;
    d->pipe_r = d->pipe_w = -1;
    PyObject *name = PyUnicode_InternFromString(how);
    PyObject *r = name ? PyObject_CallMethodOneArg(p->pool, name, pipe) : NULL;
    Py_XDECREF(name);
    Py_DECREF(pipe);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int
pump_release_if_empty(Pump *p, Dir *d)
{
    if (d->pipe != NULL && d->pending == 0)
        return pump_release_pipe(p, d, "release");
    return 0;
}

static int
pump_drop_holding(Pump *p, Dir *d)
{
    PyMem_Free(d->tail);
    d->tail = NULL;
    d->tail_off = d->tail_len = 0;
    int rc = 0;
    if (d->pipe != NULL)
        rc = pump_release_pipe(p, d, d->pending ? "discard" : "release");
    d->pending = 0;
    return rc;
}

/* Stop relaying: unhook from the epoll set and give back what is held. */
static int
pump_stop(Pump *p)
{
    int rc = 0;
    if (p->closed)
        return 0;
    p->closed = 1;
    p->dialing = 0;
    Py_CLEAR(p->on_dialed);
    pump_release_fds(p);
    for (int i = 0; i < 2; i++) {
        if (pump_drop_holding(p, &p->d[i]) < 0)
            rc = -1;
    }
    return rc;
}

static int
pump_call_done(Pump *p, PyObject *exc)
{
    PyObject *r = PyObject_CallOneArg(p->on_done, exc);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The pump failed with the Python exception currently set. */
static int
pump_fail(Pump *p, Dir *d, int writing)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    if (tb != NULL && ev != NULL)
        PyException_SetTraceback(ev, tb);
    Py_XDECREF(et);
    Py_XDECREF(tb);
    if (p->closed) {
        Py_XDECREF(ev);
        return 0;
    }
    if (d != NULL) {
        if (!writing && ev != NULL && PyObject_TypeCheck(ev, (PyTypeObject *)PyExc_OSError) &&
            ((PyOSErrorObject *)ev)->myerrno != NULL &&
            PyLong_Check(((PyOSErrorObject *)ev)->myerrno) &&
            PyLong_AsLong(((PyOSErrorObject *)ev)->myerrno) == EPIPE)
            writing = 1;
        int src_side = d == &p->d[0] ? 0 : 1;
        p->failed_side = writing ? 1 - src_side : src_side;
    }
    int rc = pump_stop(p);
    if (rc == 0)
        rc = pump_call_done(p, ev ? ev : Py_None);
    Py_XDECREF(ev);
    return rc;
}

static int
pump_fail_errno(Pump *p, Dir *d, int writing, int err)
{
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    return pump_fail(p, d, writing);
}

static ssize_t
send_nointr(int fd, const char *buf, size_t n, int flags)
{
    ssize_t s;
    do
        s = sys_sendto(fd, buf, n, flags | MSG_NOSIGNAL, NULL, 0);
    while (s < 0 && errno == EINTR);
    return s;
}

/* Read from d->src and pass on what the receiver takes at once; the byte count, 0 on EOF,
 * STEP_AGAIN when nothing was there, STEP_ERROR with errno set (or a Python error when
 * *py_error is set). */
static ssize_t
pump_fill(Pump *p, Dir *d, int more, int *py_error)
{
    if (d->pipe == NULL) {
        if (!d->spliced) {
            char *buf = p->core->scratch;
            ssize_t n;
            do
                n = sys_recv(d->src, buf, SMALL_READ, 0);
            while (n < 0 && errno == EINTR);
            if (n < 0)
                return (errno == EAGAIN || errno == EWOULDBLOCK) ? STEP_AGAIN : STEP_ERROR;
            if (n > 0) {
                ssize_t sent = send_nointr(d->dst, buf, (size_t)n, more ? MSG_MORE : 0);
                if (sent < 0) {
                    if (errno != EAGAIN && errno != EWOULDBLOCK)
                        return STEP_ERROR;
                    sent = 0;
                }
                if (sent < n) {
                    /* the scratch buffer is shared by every pump: keep the tail */
                    d->tail = PyMem_Malloc((size_t)(n - sent));
                    if (d->tail == NULL) {
                        PyErr_NoMemory();
                        *py_error = 1;
                        return STEP_ERROR;
                    }
                    memcpy(d->tail, buf + sent, (size_t)(n - sent));
                    d->tail_off = 0;
                    d->tail_len = n - sent;
                    d->pending = n - sent;
                }
                if (n == SMALL_READ) { /* a full buffer: bulk transfer, spliced from now on */
                    d->chunk = p->pipe_chunk;
                    d->spliced = 1;
                }
            }
            return n;
        }
        PyObject *pipe = PyObject_CallMethodNoArgs(p->pool, str_acquire);
        if (pipe == NULL) {
            *py_error = 1;
            return STEP_ERROR;
        }
        int r, w;
        if (!PyArg_ParseTuple(pipe, "ii", &r, &w)) {
            Py_DECREF(pipe);
            *py_error = 1;
            return STEP_ERROR;
        }
        d->pipe = pipe;
        d->pipe_r = r;
        d->pipe_w = w;
    }
    ssize_t n;
    do
        n = sys_splice(d->src, d->pipe_w, (size_t)d->chunk, SPLICE_FLAGS);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? STEP_AGAIN : STEP_ERROR;
    if (n > 0) {
        d->pending = n;
        ssize_t m;
        do
            m = sys_splice(d->pipe_r, d->dst, (size_t)n, SPLICE_FLAGS | (more ? SPLICE_F_MORE : 0));
        while (m < 0 && errno == EINTR);
        if (m < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return STEP_ERROR;
        }
        else
            d->pending -= m;
    }
    return n;
}

/* Write held bytes to d->dst until empty or it would block; -1 with errno set on error. */
static int
pump_flush(Pump *p, Dir *d)
{
    (void)p;
    if (d->pipe == NULL) {
        while (d->tail != NULL && d->tail_off < d->tail_len) {
            ssize_t s = send_nointr(d->dst, d->tail + d->tail_off, (size_t)(d->tail_len - d->tail_off), 0);
            if (s < 0)
                return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
            d->tail_off += s;
            d->pending = d->tail_len - d->tail_off;
        }
        if (d->tail != NULL && d->pending == 0) {
            PyMem_Free(d->tail);
            d->tail = NULL;
            d->tail_off = d->tail_len = 0;
        }
        return 0;
    }
    while (d->pending) {
        ssize_t m;
        do
            m = sys_splice(d->pipe_r, d->dst, (size_t)d->pending, SPLICE_FLAGS);
        while (m < 0 && errno == EINTR);
        if (m < 0)
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        d->pending -= m;
    }
    return 0;
}

static int
pump_finish(Pump *p, Dir *d)
{
    Dir *other = d == &p->d[0] ? &p->d[1] : &p->d[0];
    /* Without half-close the first FIN, once its bytes are through, ends the connection: the
     * caller's close sends it on, and a direction still open loses what it had not relayed. */
    int last = other->finished || !p->half_close;
    if (p->shutdown_last || !last) {
        if (shutdown(d->dst, SHUT_WR) < 0 && errno != ENOTCONN)
            return pump_fail_errno(p, d, 1, errno);
    }
    d->finished = 1;
    if (last && !p->closed) {
        p->closed = 1;
        pump_release_fds(p);
        return pump_call_done(p, Py_None);
    }
    return 0;
}

/* Returns -1 only when a Python callback raised (the dispatch stops and re-raises). */
static int
pump_on_readable(Pump *p, Dir *d, int unprompted)
{
    if (p->closed)
        return 0;
    int peer_closed = !unprompted && (p->core->ready_events & EPOLLRDHUP);
    for (int round = 0; round < ROUNDS_PER_WAKEUP; round++) {
        Py_ssize_t chunk = d->chunk;
        int copying = !d->spliced;
        int py_error = 0;
        p->reads++;
        ssize_t n = pump_fill(p, d, peer_closed, &py_error);
        if (n == STEP_AGAIN)
            goto drained;
        if (n == STEP_ERROR) {
            if (py_error)
                return pump_fail(p, d, 0);
            return pump_fail_errno(p, d, 0, errno);
        }
        d->moved += n;
        if (n == 0) {
            d->eof = 1;
            pump_unwatch(p, d->src, 0);
            if (d->pending) {
                if (pump_watch(p, d->dst, 1, 1) < 0)
                    return pump_fail(p, d, 0);
                return 0;
            }
            if (pump_release_if_empty(p, d) < 0)
                return pump_fail(p, d, 0);
            return pump_finish(p, d);
        }
        if (d->pending) {
            if (pump_flush(p, d) < 0)
                return pump_fail_errno(p, d, 1, errno);
            if (d->pending) {
                /* receiver is slow: stop reading until dst takes what we hold */
                pump_unwatch(p, d->src, 0);
                if (pump_watch(p, d->dst, 1, 1) < 0)
                    return pump_fail(p, d, 0);
                return 0;
            }
        }
        /* A short recv found the socket empty (TCP copies all that is queued): anything later
         * is a new edge. A short splice proves nothing (the pipe may have run out of slots), so
         * spliced reads go on to EAGAIN. */
        if (n < chunk && copying && !peer_closed)
            goto drained;
    }
    /* Out of rounds with bytes perhaps still queued: no new edge will say so, so come back
     * after the other descriptors have had their turn. */
    if (!p->closed && !d->eof && core_retry(p->core, p, d == &p->d[0] ? 0 : 1) < 0)
        return pump_fail(p, d, 0);
drained:
    if (pump_release_if_empty(p, d) < 0)
        return pump_fail(p, d, 0);
    return 0;
}

static int pump_launch_now(Pump *p, int read_first, int *spoke);

/* Tell Python how the dial went: on_dialed(code), errno > 0 if it failed, 0 connected, -1 the
 * client had sent nothing by then. -1 only if the callback raised. */
static int
pump_tell_dialed(Pump *p, PyObject *cb, int code)
{
    PyObject *arg = PyLong_FromLong(code);
    PyObject *r = arg ? PyObject_CallOneArg(cb, arg) : NULL;
    Py_XDECREF(arg);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* b, being dialed, reported writability: the connect's outcome. Connected, the pump launches
 * itself here, without a Python call unless the caller asked to be told (`notify`: passive
 * health to reset, metrics) or the early read found a client waiting for the server. A
 * failed dial always goes back to Python, which fails over to the next address or target. */
static int
pump_connected(Pump *p)
{
    Core *c = p->core;
    int fd = p->d[1].src;
    uint32_t ev = c->ready_events;
    int err = 0;
    if (ev & EV_ERR) { /* a failed connect always sets EPOLLERR; writable alone means connected */
        socklen_t len = sizeof(err);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno ? errno : EIO;
    }
    PyObject *cb = p->on_dialed;
    p->on_dialed = NULL;
    p->dialing = 0;
    if (err) {
        /* This pump is spent: Python closes b and makes a new pump for its next dial. */
        p->closed = 1;
        pump_release_fds(p);
        int rc = pump_tell_dialed(p, cb, err);
        Py_DECREF(cb);
        return rc;
    }
    if (fd < c->nwatches)
        /* Registered for writability as well from here on (one epoll_ctl fewer than asking the
         * kernel to stop): that bit is reported with b's other events and ignored until a
         * receiver falls behind; it raises an event of its own only when the send buffer was
         * full (when the pump wants it) or b changes state (our shutdown of b, once). */
        c->watches[fd].native_write = 0;
    int rc = 0;
    Py_INCREF(p);
    if (p->notify)
        rc = pump_tell_dialed(p, cb, 0);
    int spoke = 1;
    if (rc == 0 && !p->closed)
        rc = pump_launch_now(p, p->read_first, &spoke);
    if (rc == 0 && !spoke && !p->closed)
        rc = pump_tell_dialed(p, cb, -1);
    /* Bytes that came with the connect's edge (a server speaking first): no new edge follows. */
    if (rc == 0 && !p->closed && (ev & EV_IN))
        rc = pump_on_readable(p, &p->d[1], 0);
    Py_DECREF(p);
    Py_DECREF(cb);
    return rc;
}

static int
pump_on_writable(Pump *p, Dir *d)
{
    if (p->closed)
        return 0;
    if (p->dialing)
        return pump_connected(p);
    if (pump_flush(p, d) < 0)
        return pump_fail_errno(p, d, 1, errno);
    if (d->pending)
        return 0;
    pump_unwatch(p, d->dst, 1);
    if (pump_release_if_empty(p, d) < 0)
        return pump_fail(p, d, 0);
    if (d->eof)
        return pump_finish(p, d);
    if (pump_watch(p, d->src, 0, 1) < 0)
        return pump_fail(p, d, 0);
    /* What the source queued while we did not read it raised no new edge: read it now. */
    return pump_on_readable(p, d, 1);
}

static int socket_view_fd(PyObject *sock);

static int
socket_fd(PyObject *sock, int *fd)
{
    int v0 = socket_view_fd(sock);
    if (v0 >= 0) { /* the socket module's own object: its descriptor, without a method call */
        *fd = v0;
        return 0;
    }
    PyObject *r = PyObject_CallMethodNoArgs(sock, str_fileno);
    if (r == NULL)
        return -1;
    long v = PyLong_AsLong(r);
    Py_DECREF(r);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "socket is closed");
        return -1;
    }
    *fd = (int)v;
    return 0;
}

static PyObject *
pump_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"io", "a", "b", "on_done", "pool", NULL};
    PyObject *io, *a, *b, *on_done, *pool;
    if (kwds == NULL && PyTuple_GET_SIZE(args) == 5 && Py_IS_TYPE(PyTuple_GET_ITEM(args, 0), &CoreType)) {
        /* How the engine calls it, once per connection: no format string to interpret. */
        io = PyTuple_GET_ITEM(args, 0);
        a = PyTuple_GET_ITEM(args, 1);
        b = PyTuple_GET_ITEM(args, 2);
        on_done = PyTuple_GET_ITEM(args, 3);
        pool = PyTuple_GET_ITEM(args, 4);
    }
    else if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOOO", kwlist, &CoreType, &io, &a, &b, &on_done,
                                          &pool))
        return NULL;
    int fa, fb;
    if (socket_fd(a, &fa) < 0 || socket_fd(b, &fb) < 0)
        return NULL;
    PyObject *size = PyObject_GetAttr(pool, str_pipe_size);
    if (size == NULL)
        return NULL;
    Py_ssize_t pipe_chunk = PyLong_AsSsize_t(size);
    Py_DECREF(size);
    if (pipe_chunk == -1 && PyErr_Occurred())
        return NULL;
    Pump *p = (Pump *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    Py_INCREF(io);
    p->core = (Core *)io;
    Py_INCREF(a);
    p->a = a;
    Py_INCREF(b);
    p->b = b;
    Py_INCREF(on_done);
    p->on_done = on_done;
    Py_INCREF(pool);
    p->pool = pool;
    p->pipe_chunk = pipe_chunk > 0 ? pipe_chunk : 65536;
    p->failed_side = -1;
    p->shutdown_last = 1;
    p->half_close = 1;
    for (int i = 0; i < 2; i++) {
        Dir *d = &p->d[i];
        d->src = i == 0 ? fa : fb;
        d->dst = i == 0 ? fb : fa;
        d->pipe_r = d->pipe_w = -1;
        d->chunk = SMALL_READ;
    }
    return (PyObject *)p;
}

static PyObject *
pump_start(Pump *p, PyObject *Py_UNUSED(ignored))
{
    if (p->closed)
        Py_RETURN_NONE;
    for (int i = 0; i < 2; i++) {
        int fd = p->d[i].src;
        if (fd < p->core->nwatches && p->core->watches[fd].et == 2 && p->core->watches[fd].pump == NULL)
            /* A dial's registration asked for writability (the connect); the pump needs it only
             * once a receiver falls behind. Kept, it would report every later state change
             * (our own shutdown included) as "writable": one MOD now costs less. */
            p->core->watches[fd].et = 1;
        if (pump_watch(p, p->d[i].src, 0, 1) < 0) {
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            pump_release_fds(p);
            PyErr_Restore(et, ev, tb);
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
pump_close(Pump *p, PyObject *Py_UNUSED(ignored))
{
    if (pump_stop(p) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
pump_read_now(Pump *p, PyObject *arg)
{
    long index = PyLong_AsLong(arg);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (index != 0 && index != 1) {
        PyErr_SetString(PyExc_ValueError, "index must be 0 or 1");
        return NULL;
    }
    Dir *d = &p->d[index];
    long long before = d->moved;
    Py_INCREF(p);
    int rc = pump_on_readable(p, d, 1);
    int result = d->moved != before || d->eof || p->closed;
    Py_DECREF(p);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(result);
}

/* What the raw engine does the moment its dial to b connects, in one call: the caller's close
 * sends the last FIN (shutdown_last = False), start, drop the dial's writer on b (the pump owns
 * b's interest from now on; started first, so the registration is changed, not removed and
 * added again), and, if `read_first`, read a's bytes already queued. Returns False only when
 * that early read found nothing (a client waiting for the server to speak first). */
static int
pump_launch_now(Pump *p, int read_first, int *spoke)
{
    p->shutdown_last = 0;
    p->launched = 1;
    *spoke = 1;
    PyObject *r = pump_start(p, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    if (core_remove_fd(p->core, p->d[1].src, 1) < 0)
        return -1;
    if (!read_first || p->closed)
        return 0;
    Dir *d = &p->d[0];
    long long before = d->moved;
    int rc = pump_on_readable(p, d, 1);
    *spoke = d->moved != before || d->eof || p->closed;
    return rc;
}

static PyObject *
pump_launch(Pump *p, PyObject *arg)
{
    int read_first = PyObject_IsTrue(arg);
    if (read_first < 0)
        return NULL;
    int spoke;
    Py_INCREF(p);
    int rc = pump_launch_now(p, read_first, &spoke);
    Py_DECREF(p);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(spoke);
}

/* The raw engine's dial, handed over right after connect() started: b (connecting) is watched
 * for writability here, and its outcome handled in C (pump_connected) instead of through a
 * Python writer callback. Nothing is relayed before that. */
static PyObject *
pump_dial(Pump *p, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "dial(on_dialed, read_first, notify)");
        return NULL;
    }
    int read_first = PyObject_IsTrue(args[1]);
    int notify = PyObject_IsTrue(args[2]);
    if (read_first < 0 || notify < 0)
        return NULL;
    if (p->closed || p->hooked || p->dialing || p->launched) {
        PyErr_SetString(PyExc_RuntimeError, "dial() on a pump that already started");
        return NULL;
    }
    int fd = p->d[1].src;
    Core *c = p->core;
    if (check_fd(c, fd) < 0)
        return NULL;
    Watch *w = &c->watches[fd];
    if (w->used && (w->pump != NULL || w->reader != NULL || w->writer != NULL)) {
        PyErr_Format(PyExc_RuntimeError, "descriptor %d is already watched", fd);
        return NULL;
    }
    w->pump = p;
    w->lane = 0;
    w->native_write = 1;
    w->et = 2;
    w->used = 1;
    p->hooked = 1;
    if (core_changed(c, fd) < 0) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        pump_release_fds(p);
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    Py_INCREF(args[0]);
    p->on_dialed = args[0];
    p->dialing = 1;
    p->read_first = (char)read_first;
    p->notify = (char)notify;
    Py_RETURN_NONE;
}

static int socket_close_direct(PyObject *sock);

/* Stop (if still running), then drop both sockets from the set and close them: the end of a
 * relayed connection in one call. */
static PyObject *
pump_end(Pump *p, PyObject *Py_UNUSED(ignored))
{
    int rc = pump_stop(p);
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    if (rc < 0)
        PyErr_Fetch(&et, &ev, &tb);
    PyObject *socks[2] = {p->a, p->b};
    int fds[2] = {p->d[0].src, p->d[1].src};
    for (int i = 0; i < 2; i++) {
        PyObject *sock = socks[i];
        if (sock == NULL)
            continue;
        Py_INCREF(sock);
        if (p->core != NULL)
            core_forget_fd(p->core, fds[i]);
        if (socket_close_direct(sock)) {
            Py_DECREF(sock);
            continue;
        }
        PyObject *r = PyObject_CallMethodNoArgs(sock, str_close);
        if (r == NULL) {
            if (et == NULL && ev == NULL)
                PyErr_Fetch(&et, &ev, &tb);
            else
                PyErr_Clear();
        }
        Py_XDECREF(r);
        Py_DECREF(sock);
    }
    if (et != NULL || ev != NULL) {
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
pump_get_pipes_held(Pump *p, void *Py_UNUSED(closure))
{
    return PyLong_FromLong((p->d[0].pipe != NULL) + (p->d[1].pipe != NULL));
}

static PyObject *
pump_get_held(Pump *p, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(p->d[0].pending + p->d[1].pending);
}

static int
pump_traverse(Pump *p, visitproc visit, void *arg)
{
    Py_VISIT(p->core);
    Py_VISIT(p->a);
    Py_VISIT(p->b);
    Py_VISIT(p->on_done);
    Py_VISIT(p->on_dialed);
    Py_VISIT(p->pool);
    Py_VISIT(p->d[0].pipe);
    Py_VISIT(p->d[1].pipe);
    return 0;
}

static int
pump_clear(Pump *p)
{
    pump_release_fds(p);
    Py_CLEAR(p->on_done);
    Py_CLEAR(p->on_dialed);
    Py_CLEAR(p->a);
    Py_CLEAR(p->b);
    return 0;
}

static void
pump_dealloc(Pump *p)
{
    PyObject_GC_UnTrack(p);
    pump_release_fds(p);
    for (int i = 0; i < 2; i++) {
        Dir *d = &p->d[i];
        PyMem_Free(d->tail);
        d->tail = NULL;
        if (d->pipe != NULL) {
            /* Not closed properly: the pipe may hold bytes, so it cannot go back to the pool. */
            close(d->pipe_r);
            close(d->pipe_w);
            Py_CLEAR(d->pipe);
        }
    }
    Py_CLEAR(p->on_done);
    Py_CLEAR(p->on_dialed);
    Py_CLEAR(p->a);
    Py_CLEAR(p->b);
    Py_CLEAR(p->pool);
    Py_CLEAR(p->core);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef pump_methods[] = {
    {"start", (PyCFunction)pump_start, METH_NOARGS, "Begin relaying both ways."},
    {"close", (PyCFunction)pump_close, METH_NOARGS,
     "Stop relaying without calling the completion callback."},
    {"read_now", (PyCFunction)pump_read_now, METH_O,
     "Read side index (0: from a) without waiting for readiness; False if nothing was there."},
    {"launch", (PyCFunction)pump_launch, METH_O,
     "Start on a just-connected b (see the C source); False if an early read of a found nothing."},
    {"dial", (PyCFunction)(void (*)(void))pump_dial, METH_FASTCALL,
     "dial(on_dialed, read_first, notify): b is connecting; launch when it connects (see the C source)."},
    {"finish", (PyCFunction)pump_end, METH_NOARGS,
     "Stop, then forget both sockets in the epoll set and close them."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef pump_members[] = {
    {"failed_side", T_INT, offsetof(Pump, failed_side), 0,
     "Which socket an error came from: 0 for a, 1 for b, -1 when none."},
    {"bytes_a_to_b", T_LONGLONG, offsetof(Pump, d[0].moved), READONLY, "Bytes read from a so far."},
    {"bytes_b_to_a", T_LONGLONG, offsetof(Pump, d[1].moved), READONLY, "Bytes read from b so far."},
    {"reads", T_LONGLONG, offsetof(Pump, reads), READONLY, "Read calls made on either source so far."},
    {"closed", T_BOOL, offsetof(Pump, closed), READONLY, "True once the pump has stopped."},
    {"launched", T_BOOL, offsetof(Pump, launched), READONLY, "True once relaying started."},
    {"shutdown_last", T_BOOL, offsetof(Pump, shutdown_last), 0,
     "False when the caller's close sends the last FIN."},
    {"half_close", T_BOOL, offsetof(Pump, half_close), 0,
     "False: the first direction to finish (FIN, its bytes through) ends the pump."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef pump_getset[] = {
    {"pipes_held", (getter)pump_get_pipes_held, NULL, "Pipes held right now.", NULL},
    {"held", (getter)pump_get_held, NULL, "Bytes read and not yet passed on, both ways.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "portway.stream._fastpath.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Relay between two connected sockets on a compiled EpollSet (C SplicePump).",
    .tp_new = pump_new,
    .tp_dealloc = (destructor)pump_dealloc,
    .tp_traverse = (traverseproc)pump_traverse,
    .tp_clear = (inquiry)pump_clear,
    .tp_methods = pump_methods,
    .tp_members = pump_members,
    .tp_getset = pump_getset,
};

/* ---- UDP: the listening socket and the sessions' sockets ---------------------------------- */

/* The listening socket, read in C (`recvmmsg`): a datagram from a client whose session is
 * *bound* here goes straight to its lane's socket; any other (a new client, a session still
 * being set up, one that must first check its target is still up, a hooked session) goes to
 * Python as `on_datagram(data, address)`, exactly as a transport's datagram_received would.
 * Replies leave through the same socket. Closed (fd -1) by the listener before its socket
 * closes, so a lane that outlives it drops replies instead of writing to a descriptor number
 * the process may already have reused. */
struct Inlet {
    PyObject_HEAD
    Core *core;
    PyObject *sock; /* kept alive while its descriptor is watched */
    PyObject *on_datagram, *on_error;
    PyObject *lanes; /* dict: address key (bytes) -> bound Lane */
    int fd, family;
    char closed;
    int hooked;
    long long direct; /* datagrams relayed without Python: lets tests prove the fast path ran */
};

static PyTypeObject InletType;

struct Lane {
    PyObject_HEAD
    Core *core;
    PyObject *sock; /* the session's socket, connected to its target: kept alive */
    Inlet *inlet;
    PyObject *on_error;
    PyObject *key;    /* the client's address key while bound in the inlet */
    PyObject *prefix; /* bytes sent before each datagram relayed in C (a PROXY header), or NULL */
    int fd;
    struct sockaddr_storage client;
    socklen_t client_len;
    long long bytes_down, dgrams_down, bytes_up, dgrams_up;
    char touched, closed, bound;
    int hooked;
};

static PyTypeObject LaneType;

/* Datagrams taken per wake-up before yielding to other descriptors (level-triggered: the rest
 * are reported again), VLEN at a time. */
#define LANE_BATCH 64
#define LANE_VLEN 8
/* The largest UDP payload (IPv6 without jumbograms); a datagram is never cut. */
#define DATAGRAM_MAX 65536

/* w->lane: what a native reader that is not a pump is. */
#define IS_LANE 1
#define IS_INLET 2

static int
udp_watch(Core *c, int fd, PyObject *owner, uint8_t kind, int *hooked, int on)
{
    if (on && check_fd(c, fd) < 0)
        return -1;
    if (fd >= c->nwatches)
        return 0;
    Watch *w = &c->watches[fd];
    if (!on && (w->pump != (Pump *)owner || w->lane != kind))
        return 0; /* forgotten meanwhile */
    w->native_read = (uint8_t)on;
    if (on) {
        w->pump = (Pump *)owner;
        w->lane = kind;
        w->used = 1;
    }
    *hooked = on;
    return core_changed(c, fd);
}

static void
lane_unhooked(Lane *l)
{
    l->hooked = 0;
}

static void
inlet_unhooked(Inlet *in)
{
    in->hooked = 0;
}

static void
lane_unhook(Lane *l)
{
    if (l->hooked && l->core != NULL && udp_watch(l->core, l->fd, (PyObject *)l, IS_LANE, &l->hooked, 0) < 0)
        PyErr_Clear();
    l->hooked = 0;
}

static void
inlet_unhook(Inlet *in)
{
    if (in->hooked && in->core != NULL &&
        udp_watch(in->core, in->fd, (PyObject *)in, IS_INLET, &in->hooked, 0) < 0)
        PyErr_Clear();
    in->hooked = 0;
}

static char *
core_dgram_buffer(Core *c, char **slot)
{
    if (*slot == NULL) {
        *slot = PyMem_Malloc((size_t)LANE_VLEN * DATAGRAM_MAX);
        if (*slot == NULL)
            PyErr_NoMemory();
    }
    return *slot;
}

/* The inlet's key for an address: family, port and address (and an IPv6 scope), not the flow
 * label, which the kernel leaves 0 unless asked for. */
static PyObject *
address_key(const struct sockaddr_storage *ss)
{
    char k[24];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        memcpy(k, &sin->sin_family, 2);
        memcpy(k + 2, &sin->sin_port, 2);
        memcpy(k + 4, &sin->sin_addr, 4);
        return PyBytes_FromStringAndSize(k, 8);
    }
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
    memcpy(k, &sin6->sin6_family, 2);
    memcpy(k + 2, &sin6->sin6_port, 2);
    memcpy(k + 4, &sin6->sin6_addr, 16);
    memcpy(k + 20, &sin6->sin6_scope_id, 4);
    return PyBytes_FromStringAndSize(k, 24);
}

/* An address as the socket module gives it: (host, port) or (host, port, flowinfo, scope_id). */
static PyObject *
address_tuple(const struct sockaddr_storage *ss)
{
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        if (inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host)) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, ntohs(sin->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        if (inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host)) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, ntohs(sin6->sin6_port), ntohl(sin6->sin6_flowinfo),
                             sin6->sin6_scope_id);
    }
    PyErr_Format(PyExc_ValueError, "unsupported address family %d", ss->ss_family);
    return NULL;
}

/* Call `cb(OSError(err))`, as a transport's error_received would. -1 only if that raised. */
static int
report_errno(PyObject *cb, int err)
{
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    Py_XDECREF(et);
    Py_XDECREF(tb);
    if (ev == NULL)
        return -1;
    PyObject *r = PyObject_CallOneArg(cb, ev);
    Py_DECREF(ev);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int
inlet_report_errno(Inlet *in, int err)
{
    return report_errno(in->on_error, err);
}

/* The lane is no longer bound; the caller sees to the inlet's dict. Returns the key it was
 * bound under (a new reference to drop), or NULL. */
static PyObject *
lane_drop_binding(Lane *l)
{
    PyObject *key = l->key;
    l->bound = 0;
    l->key = NULL;
    Py_CLEAR(l->prefix);
    return key;
}

static void
lane_unbind(Lane *l)
{
    if (!l->bound)
        return;
    Inlet *in = l->inlet;
    PyObject *key = lane_drop_binding(l);
    if (key == NULL)
        return;
    if (in != NULL && in->lanes != NULL) {
        PyObject *cur = PyDict_GetItemWithError(in->lanes, key);
        if (cur == (PyObject *)l && PyDict_DelItem(in->lanes, key) < 0)
            PyErr_Clear();
        else if (cur == NULL && PyErr_Occurred())
            PyErr_Clear();
    }
    Py_DECREF(key);
}

/* An error of the session's socket (ICMP unreachable from the target surfaces as ECONNREFUSED):
 * the session is no longer bound (its next datagram goes through Python, which may move it to
 * another target), and Python hears of it. -1 only if that raised. */
static int
lane_report_errno(Lane *l, int err)
{
    lane_unbind(l);
    return report_errno(l->on_error, err);
}

/* Point each of the LANE_VLEN messages at its own DATAGRAM_MAX slice of `buf` (and, if
 * `from`, at its own source address). */
static void
batch_prepare(struct mmsghdr *msgs, struct iovec *iov, char *buf, struct sockaddr_storage *from)
{
    memset(msgs, 0, sizeof(*msgs) * LANE_VLEN);
    for (int i = 0; i < LANE_VLEN; i++) {
        iov[i].iov_base = buf + (size_t)i * DATAGRAM_MAX;
        iov[i].iov_len = DATAGRAM_MAX;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if (from != NULL) {
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof(from[i]);
        }
    }
}

static int
lane_on_readable(Lane *l)
{
    if (l->closed)
        return 0;
    Core *c = l->core;
    char *buf = core_dgram_buffer(c, &c->dgram);
    if (buf == NULL)
        return -1;
    /* recvmmsg: the replies queued, in one call that does not end with a failing EAGAIN read
     * (as a recv loop would, once per wake-up); sendmmsg passes them all to the client. */
    struct mmsghdr msgs[LANE_VLEN];
    struct iovec iov[LANE_VLEN];
    for (int round = 0; round < LANE_BATCH / LANE_VLEN && !l->closed; round++) {
        batch_prepare(msgs, iov, buf, NULL);
        int n;
        do
            n = sys_recvmmsg(l->fd, msgs, LANE_VLEN, MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return lane_report_errno(l, errno);
        }
        for (int i = 0; i < n; i++) {
            l->bytes_down += msgs[i].msg_len;
            iov[i].iov_len = msgs[i].msg_len;
            msgs[i].msg_hdr.msg_name = &l->client;
            msgs[i].msg_hdr.msg_namelen = l->client_len;
        }
        l->dgrams_down += n;
        l->touched = 1;
        int out = l->inlet->fd;
        if (out >= 0 && n > 0) {
            /* A full listener buffer drops replies, as UDP may (no unbounded queue here). */
            int s;
            do
                s = n == 1 ? (int)sys_sendto(out, iov[0].iov_base, iov[0].iov_len, MSG_DONTWAIT | MSG_NOSIGNAL,
                                         (struct sockaddr *)&l->client, l->client_len)
                           : sys_sendmmsg(out, msgs, (unsigned int)n, MSG_DONTWAIT | MSG_NOSIGNAL);
            while (s < 0 && errno == EINTR);
        }
        if (n < LANE_VLEN)
            break; /* fewer than asked for: the socket is empty now */
    }
    return 0;
}

/* Client -> target, one datagram on the session's connected socket, after the bound prefix if
 * `prefixed`. A full socket buffer drops it (UDP may); an error goes to on_error. */
static int
lane_forward(Lane *l, const char *data, size_t len, int prefixed)
{
    ssize_t s;
    PyObject *prefix = prefixed ? l->prefix : NULL;
    if (prefix != NULL && PyBytes_GET_SIZE(prefix) > 0) {
        struct iovec iov[2] = {{PyBytes_AS_STRING(prefix), (size_t)PyBytes_GET_SIZE(prefix)},
                               {(void *)data, len}};
        struct msghdr msg;
        memset(&msg, 0, sizeof(msg));
        msg.msg_iov = iov;
        msg.msg_iovlen = 2;
        do
            s = sys_sendmsg(l->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        while (s < 0 && errno == EINTR);
    }
    else {
        do
            s = sys_sendto(l->fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL, NULL, 0);
        while (s < 0 && errno == EINTR);
    }
    if (s < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
        return lane_report_errno(l, errno);
    return 0;
}

static int
inlet_on_readable(Inlet *in)
{
    if (in->closed || in->fd < 0)
        return 0;
    Core *c = in->core;
    char *buf = core_dgram_buffer(c, &c->dgram_in);
    if (buf == NULL)
        return -1;
    struct mmsghdr msgs[LANE_VLEN];
    struct iovec iov[LANE_VLEN];
    struct sockaddr_storage from[LANE_VLEN];
    Py_INCREF(in);
    int result = 0;
    for (int round = 0; round < LANE_BATCH / LANE_VLEN && !in->closed && result == 0; round++) {
        batch_prepare(msgs, iov, buf, from);
        int n;
        do
            n = sys_recvmmsg(in->fd, msgs, LANE_VLEN, MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                result = report_errno(in->on_error, errno);
            break;
        }
        for (int i = 0; i < n && !in->closed && result == 0; i++) {
            const char *data = (const char *)iov[i].iov_base;
            size_t len = msgs[i].msg_len;
            if (from[i].ss_family != AF_INET && from[i].ss_family != AF_INET6)
                continue; /* no address to answer: nothing to do with it */
            PyObject *key = address_key(&from[i]);
            if (key == NULL) {
                result = -1;
                break;
            }
            Lane *l = (Lane *)PyDict_GetItemWithError(in->lanes, key);
            Py_DECREF(key);
            if (l == NULL && PyErr_Occurred()) {
                result = -1;
                break;
            }
            if (l != NULL && l->bound && !l->closed) {
                Py_INCREF(l);
                l->dgrams_up++;
                l->bytes_up += (long long)len + (l->prefix ? PyBytes_GET_SIZE(l->prefix) : 0);
                l->touched = 1;
                in->direct++;
                result = lane_forward(l, data, len, 1);
                Py_DECREF(l);
                continue;
            }
            PyObject *addr = address_tuple(&from[i]);
            PyObject *bytes = addr ? PyBytes_FromStringAndSize(data, (Py_ssize_t)len) : NULL;
            PyObject *r = bytes ? PyObject_CallFunctionObjArgs(in->on_datagram, bytes, addr, NULL) : NULL;
            Py_XDECREF(addr);
            Py_XDECREF(bytes);
            if (r == NULL)
                result = -1;
            Py_XDECREF(r);
        }
        if (n < LANE_VLEN)
            break; /* fewer than asked for: the socket is empty now */
    }
    Py_DECREF(in);
    return result;
}

static int
parse_client(PyObject *addr, int family, struct sockaddr_storage *ss, socklen_t *len)
{
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope_id = 0;
    memset(ss, 0, sizeof(*ss));
    if (family != AF_INET && family != AF_INET6) {
        PyErr_Format(PyExc_ValueError, "unsupported address family %d", family);
        return -1;
    }
    if (!PyTuple_Check(addr))
        goto bad;
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        if (!PyArg_ParseTuple(addr, "si", &host, &port))
            goto bad;
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1)
            goto bad;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        *len = sizeof(*sin);
    }
    else if (family == AF_INET6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        if (!PyArg_ParseTuple(addr, "si|II", &host, &port, &flowinfo, &scope_id))
            goto bad;
        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1)
            goto bad;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        sin6->sin6_flowinfo = htonl(flowinfo);
        sin6->sin6_scope_id = scope_id;
        *len = sizeof(*sin6);
    }
    else {
        PyErr_Format(PyExc_ValueError, "unsupported address family %d", family);
        return -1;
    }
    if (port < 0 || port > 65535)
        goto bad;
    return 0;
bad:
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "invalid client address %R for address family %d", addr, family);
    return -1;
}

static PyObject *
lane_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"io", "sock", "inlet", "client", "on_error", NULL};
    PyObject *io, *sock, *inlet, *client, *on_error;
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO!OO", kwlist, &CoreType, &io, &sock, &InletType, &inlet,
                                     &client, &on_error))
        return NULL;
    if (((Inlet *)inlet)->core != (Core *)io) {
        PyErr_SetString(PyExc_ValueError, "the lane and its inlet must share an epoll set");
        return NULL;
    }
    if (socket_fd(sock, &fd) < 0)
        return NULL;
    Lane *l = (Lane *)type->tp_alloc(type, 0);
    if (l == NULL)
        return NULL;
    /* The client's address is in the listening socket's family (a dual-stack listener sees IPv4
     * clients as mapped IPv6 addresses), whatever the family of the target. */
    if (parse_client(client, ((Inlet *)inlet)->family, &l->client, &l->client_len) < 0) {
        Py_DECREF(l);
        return NULL;
    }
    Py_INCREF(io);
    l->core = (Core *)io;
    Py_INCREF(sock);
    l->sock = sock;
    Py_INCREF(inlet);
    l->inlet = (Inlet *)inlet;
    Py_INCREF(on_error);
    l->on_error = on_error;
    l->fd = fd;
    return (PyObject *)l;
}

static PyObject *
lane_start(Lane *l, PyObject *Py_UNUSED(ignored))
{
    if (l->closed)
        Py_RETURN_NONE;
    if (udp_watch(l->core, l->fd, (PyObject *)l, IS_LANE, &l->hooked, 1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Client -> target from Python (a datagram that did not come through a binding). */
static PyObject *
lane_send(Lane *l, PyObject *arg)
{
    Py_buffer view;
    if (l->closed)
        Py_RETURN_NONE;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int rc = lane_forward(l, view.buf, (size_t)view.len, 0);
    PyBuffer_Release(&view);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Relay this lane's client's datagrams to it in C from now on, after `prefix` (the PROXY
 * header of a relaying session). The session asks for it once its target is set up and known
 * to be up; anything that may change that (an error of the socket, a health change in the pool,
 * the lane or the inlet closing) unbinds it, and the client's datagrams go through Python. */
static PyObject *
lane_bind(Lane *l, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"prefix", NULL};
    PyObject *prefix = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|S", kwlist, &prefix))
        return NULL;
    Inlet *in = l->inlet;
    if (in == NULL || in->closed || l->closed || in->lanes == NULL)
        Py_RETURN_FALSE;
    lane_unbind(l);
    PyObject *key = address_key(&l->client);
    if (key == NULL)
        return NULL;
    PyObject *old = PyDict_GetItemWithError(in->lanes, key);
    if (old == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        return NULL;
    }
    if (old != NULL) /* the client moved to a new session: the old one stops being bound */
        Py_XDECREF(lane_drop_binding((Lane *)old));
    if (PyDict_SetItem(in->lanes, key, (PyObject *)l) < 0) {
        Py_DECREF(key);
        return NULL;
    }
    l->key = key;
    Py_XINCREF(prefix);
    l->prefix = prefix;
    l->bound = 1;
    Py_RETURN_TRUE;
}

static PyObject *
lane_unbind_py(Lane *l, PyObject *Py_UNUSED(ignored))
{
    lane_unbind(l);
    Py_RETURN_NONE;
}

static PyObject *
lane_close(Lane *l, PyObject *Py_UNUSED(ignored))
{
    l->closed = 1;
    lane_unbind(l);
    lane_unhook(l);
    Py_RETURN_NONE;
}

static int
lane_traverse(Lane *l, visitproc visit, void *arg)
{
    Py_VISIT(l->core);
    Py_VISIT(l->sock);
    Py_VISIT(l->inlet);
    Py_VISIT(l->on_error);
    return 0;
}

static int
lane_clear(Lane *l)
{
    lane_unbind(l);
    lane_unhook(l);
    Py_CLEAR(l->on_error);
    Py_CLEAR(l->sock);
    return 0;
}

static void
lane_dealloc(Lane *l)
{
    PyObject_GC_UnTrack(l);
    lane_unbind(l);
    lane_unhook(l);
    Py_CLEAR(l->on_error);
    Py_CLEAR(l->sock);
    Py_CLEAR(l->key);
    Py_CLEAR(l->prefix);
    Py_CLEAR(l->inlet);
    Py_CLEAR(l->core);
    Py_TYPE(l)->tp_free((PyObject *)l);
}

static PyMethodDef lane_methods[] = {
    {"start", (PyCFunction)lane_start, METH_NOARGS, "Relay the target's replies from now on."},
    {"send", (PyCFunction)lane_send, METH_O, "Send one datagram to the target."},
    {"bind", (PyCFunction)(void (*)(void))lane_bind, METH_VARARGS | METH_KEYWORDS,
     "Take the client's datagrams from the inlet in C, after `prefix`; False if closed."},
    {"unbind", (PyCFunction)lane_unbind_py, METH_NOARGS, "The client's datagrams go through Python again."},
    {"close", (PyCFunction)lane_close, METH_NOARGS, "Stop relaying (the caller closes the socket)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef lane_members[] = {
    {"bytes_down", T_LONGLONG, offsetof(Lane, bytes_down), READONLY, "Reply bytes from the target."},
    {"dgrams_down", T_LONGLONG, offsetof(Lane, dgrams_down), READONLY, "Replies from the target."},
    {"bytes_up", T_LONGLONG, offsetof(Lane, bytes_up), READONLY, "Bytes relayed through the binding."},
    {"dgrams_up", T_LONGLONG, offsetof(Lane, dgrams_up), READONLY, "Datagrams relayed through the binding."},
    {"closed", T_BOOL, offsetof(Lane, closed), READONLY, "True once closed."},
    {"bound", T_BOOL, offsetof(Lane, bound), READONLY, "True while the inlet relays to it directly."},
    {"touched", T_BOOL, offsetof(Lane, touched), 0, "Set by every datagram relayed in C; the idle sweep clears it."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "portway.stream._fastpath.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A UDP session's socket to its target: sends, and relays the replies in C.",
    .tp_new = lane_new,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_methods = lane_methods,
    .tp_members = lane_members,
};

static PyObject *
inlet_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"io", "sock", "on_datagram", "on_error", NULL};
    PyObject *io, *sock, *on_datagram, *on_error;
    int fd, family;
    socklen_t flen = sizeof(family);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOO", kwlist, &CoreType, &io, &sock, &on_datagram, &on_error))
        return NULL;
    if (socket_fd(sock, &fd) < 0)
        return NULL;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &flen) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (family != AF_INET && family != AF_INET6) {
        PyErr_Format(PyExc_ValueError, "unsupported address family %d", family);
        return NULL;
    }
    Inlet *in = (Inlet *)type->tp_alloc(type, 0);
    if (in == NULL)
        return NULL;
    in->lanes = PyDict_New();
    if (in->lanes == NULL) {
        Py_DECREF(in);
        return NULL;
    }
    Py_INCREF(io);
    in->core = (Core *)io;
    Py_INCREF(sock);
    in->sock = sock;
    Py_INCREF(on_datagram);
    in->on_datagram = on_datagram;
    Py_INCREF(on_error);
    in->on_error = on_error;
    in->fd = fd;
    in->family = family;
    return (PyObject *)in;
}

static PyObject *
inlet_start(Inlet *in, PyObject *Py_UNUSED(ignored))
{
    if (in->closed)
        Py_RETURN_NONE;
    if (udp_watch(in->core, in->fd, (PyObject *)in, IS_INLET, &in->hooked, 1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Forget every binding: each session's next datagram goes through Python again. */
static void
inlet_unbind_lanes(Inlet *in)
{
    PyObject *lanes = in->lanes;
    if (lanes == NULL)
        return;
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(lanes, &pos, &k, &v))
        Py_XDECREF(lane_drop_binding((Lane *)v));
    PyDict_Clear(lanes);
}

static PyObject *
inlet_unbind_all(Inlet *in, PyObject *Py_UNUSED(ignored))
{
    inlet_unbind_lanes(in);
    Py_RETURN_NONE;
}

/* The listening socket is closing: stop reading it, and drop replies from now on. */
static PyObject *
inlet_close(Inlet *in, PyObject *Py_UNUSED(ignored))
{
    inlet_unhook(in);
    in->closed = 1;
    in->fd = -1;
    inlet_unbind_lanes(in);
    Py_RETURN_NONE;
}

static PyObject *
inlet_get_closed(Inlet *in, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(in->closed);
}

static PyObject *
inlet_get_bound(Inlet *in, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(in->lanes != NULL ? PyDict_GET_SIZE(in->lanes) : 0);
}

static int
inlet_traverse(Inlet *in, visitproc visit, void *arg)
{
    Py_VISIT(in->core);
    Py_VISIT(in->sock);
    Py_VISIT(in->on_datagram);
    Py_VISIT(in->on_error);
    Py_VISIT(in->lanes);
    return 0;
}

static int
inlet_clear(Inlet *in)
{
    inlet_unhook(in);
    inlet_unbind_lanes(in);
    Py_CLEAR(in->lanes);
    Py_CLEAR(in->on_datagram);
    Py_CLEAR(in->on_error);
    Py_CLEAR(in->sock);
    return 0;
}

static void
inlet_dealloc(Inlet *in)
{
    PyObject_GC_UnTrack(in);
    inlet_clear(in);
    Py_CLEAR(in->core);
    Py_TYPE(in)->tp_free((PyObject *)in);
}

static PyMethodDef inlet_methods[] = {
    {"start", (PyCFunction)inlet_start, METH_NOARGS, "Read the listening socket from now on."},
    {"unbind_all", (PyCFunction)inlet_unbind_all, METH_NOARGS, "Every client goes through Python again."},
    {"close", (PyCFunction)inlet_close, METH_NOARGS,
     "The listening socket is closing: stop reading it and drop replies (the caller closes it)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef inlet_members[] = {
    {"direct", T_LONGLONG, offsetof(Inlet, direct), READONLY, "Datagrams relayed through bindings."},
    {"family", T_INT, offsetof(Inlet, family), READONLY, "The listening socket's address family."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef inlet_getset[] = {
    {"closed", (getter)inlet_get_closed, NULL, "True once closed.", NULL},
    {"bound", (getter)inlet_get_bound, NULL, "How many clients are bound.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject InletType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "portway.stream._fastpath.Inlet",
    .tp_basicsize = sizeof(Inlet),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A UDP listening socket read in C: bound clients' datagrams go straight to their lanes.",
    .tp_new = inlet_new,
    .tp_dealloc = (destructor)inlet_dealloc,
    .tp_traverse = (traverseproc)inlet_traverse,
    .tp_clear = (inquiry)inlet_clear,
    .tp_methods = inlet_methods,
    .tp_members = inlet_members,
    .tp_getset = inlet_getset,
};


/* ---- accept and connect ------------------------------------------------------------------ */

/* The socket module's socket object, made here for a descriptor we already have. Python's own
 * constructor, given a descriptor, calls getsockname() to validate it: one syscall per accepted
 * connection that tells us nothing (accept4 just made the descriptor). The object's layout is
 * the socket module's (Modules/socketmodule.h, unchanged since 3.7); `socket_view_init` checks
 * it against an object the module made itself and, if anything differs, every socket goes
 * through the constructor instead. */
typedef struct {
    PyObject_HEAD
    int sock_fd;
    int sock_family;
    int sock_type;
    int sock_proto;
    PyObject *(*errorhandler)(void);
    int64_t sock_timeout;
} SocketView;

typedef struct {
    PyTypeObject *Sock_Type;
    PyObject *error;
    PyObject *timeout_error;
} SocketCAPI;

static PyTypeObject *sock_type;     /* _socket.socket */
static SocketView sock_template;    /* type, proto, timeout, errorhandler of a non-blocking TCP socket */
static int sock_view_ok;            /* the layout checked out: objects are made directly */
static PyObject *empty_tuple;

static void
socket_view_init(void)
{
    SocketCAPI *api = PyCapsule_Import("_socket.CAPI", 0);
    if (api == NULL) {
        PyErr_Clear();
        return;
    }
    sock_type = api->Sock_Type;
    Py_INCREF(sock_type);
    PyObject *probe = PyObject_CallFunction((PyObject *)sock_type, "ii", AF_INET, SOCK_STREAM | SOCK_NONBLOCK);
    if (probe == NULL) {
        PyErr_Clear();
        return;
    }
    SocketView *v = (SocketView *)probe;
    PyObject *fileno = PyObject_CallMethod(probe, "fileno", NULL);
    PyObject *family = PyObject_GetAttrString(probe, "family");
    PyObject *timeout = PyObject_CallMethod(probe, "gettimeout", NULL);
    int ok = fileno != NULL && family != NULL && timeout != NULL && Py_TYPE(probe)->tp_basicsize >= (Py_ssize_t)sizeof(SocketView) &&
             PyLong_AsLong(fileno) == v->sock_fd && v->sock_fd >= 0 && PyLong_AsLong(family) == AF_INET &&
             v->sock_family == AF_INET && v->sock_timeout == 0 && PyFloat_Check(timeout) &&
             PyFloat_AsDouble(timeout) == 0.0 && v->errorhandler != NULL;
    Py_XDECREF(fileno);
    Py_XDECREF(family);
    Py_XDECREF(timeout);
    if (ok) {
        sock_template = *v;
        sock_view_ok = 1;
    }
    PyErr_Clear();
    PyObject *r = PyObject_CallMethod(probe, "close", NULL);
    Py_XDECREF(r);
    PyErr_Clear();
    Py_DECREF(probe);
}

/* The descriptor of a socket module object (or of a subclass: `socket.socket`), read from its
 * struct when the layout checked out; -1 for anything else (the caller asks for `fileno()`). */
static int
socket_view_fd(PyObject *sock)
{
    if (!sock_view_ok || !PyObject_TypeCheck(sock, sock_type))
        return -1;
    return ((SocketView *)sock)->sock_fd;
}

/* Close a socket object of the module's own type (what accept and connect here make) as its
 * close() does, less the method call and the GIL's release around close(2): the descriptor is
 * marked closed first, so the object never closes it again. Returns 0, untouched, for anything
 * else (a `socket.socket` keeps its own bookkeeping: the caller calls its close()). Close
 * errors are dropped: Linux frees the descriptor whatever close(2) returns. */
static int
socket_close_direct(PyObject *sock)
{
    if (!sock_view_ok || Py_TYPE(sock) != sock_type)
        return 0;
    SocketView *v = (SocketView *)sock;
    int fd = v->sock_fd;
    v->sock_fd = -1;
    if (fd >= 0)
        (void)syscall(SYS_close, (long)fd);
    return 1;
}

/* A non-blocking TCP socket object owning `fd` (closed here if that fails). */
static PyObject *
socket_object(int fd, int family)
{
    if (sock_type == NULL) {
        close(fd);
        PyErr_SetString(PyExc_RuntimeError, "the socket module's C API is not available");
        return NULL;
    }
    if (!sock_view_ok) {
        PyObject *s = PyObject_CallFunction((PyObject *)sock_type, "iiii", family, SOCK_STREAM | SOCK_NONBLOCK, 0, fd);
        if (s == NULL)
            close(fd);
        return s;
    }
    PyObject *s = sock_type->tp_new(sock_type, empty_tuple, NULL);
    if (s == NULL) {
        close(fd);
        return NULL;
    }
    SocketView *v = (SocketView *)s;
    v->sock_fd = fd;
    v->sock_family = family;
    v->sock_type = sock_template.sock_type;
    v->sock_proto = sock_template.sock_proto;
    v->errorhandler = sock_template.errorhandler;
    v->sock_timeout = sock_template.sock_timeout;
    return s;
}

/* accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC: the new socket is non-blocking from the start (no
 * ioctl(FIONBIO), as socket.accept() + setblocking(False) would cost), and its socket object is
 * made without the constructor's getsockname. Returns (socket, address) with the address as the
 * socket module gives it. */
static PyObject *
fp_accept(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int lfd;
    if (parse_fd(arg, &lfd) < 0)
        return NULL;
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    int fd;
    do
        fd = sys_accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *addr = address_tuple(&ss);
    if (addr == NULL) {
        close(fd);
        return NULL;
    }
    PyObject *sock = socket_object(fd, ss.ss_family);
    if (sock == NULL) {
        Py_DECREF(addr);
        return NULL;
    }
    return Py_BuildValue("(NN)", sock, addr);
}

/* A dial in one call: a non-blocking, close-on-exec TCP socket with TCP_NODELAY (the relay
 * passes each message on as it comes: Nagle would hold back the last segment of a reply),
 * connecting to `address` ((host, port) or (host, port, flowinfo, scope_id), numeric).
 * Returns (socket, 0) once connecting or connected, or (None, errno) if the connect failed at
 * once; raises OSError when no socket could be made (out of descriptors: the caller stops). */
static PyObject *
fp_connect(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "connect(family, address)");
        return NULL;
    }
    long family = PyLong_AsLong(args[0]);
    if (family == -1 && PyErr_Occurred())
        return NULL;
    struct sockaddr_storage ss;
    socklen_t len;
    if (parse_client(args[1], (int)family, &ss, &len) < 0)
        return NULL;
    int fd = socket((int)family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int rc;
    do
        rc = sys_connect(fd, (struct sockaddr *)&ss, len);
    while (rc < 0 && errno == EINTR);
    if (rc < 0 && errno != EINPROGRESS && errno != EAGAIN) {
        int err = errno;
        close(fd);
        return Py_BuildValue("(Oi)", Py_None, err);
    }
    PyObject *sock = socket_object(fd, (int)family);
    if (sock == NULL)
        return NULL;
    return Py_BuildValue("(Ni)", sock, 0);
}

static PyMethodDef fastpath_functions[] = {
    {"accept", (PyCFunction)fp_accept, METH_O,
     "accept(listen_fd) -> (socket, address): a non-blocking, close-on-exec connection."},
    {"connect", (PyCFunction)(void (*)(void))fp_connect, METH_FASTCALL,
     "connect(family, address) -> (socket, 0) connecting, or (None, errno): a non-blocking dial."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "portway.stream._fastpath",
    .m_doc = "The raw engine's epoll set and relay pump, compiled.",
    .m_size = -1,
    .m_methods = fastpath_functions,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (PyType_Ready(&CoreType) < 0 || PyType_Ready(&PumpType) < 0 || PyType_Ready(&LaneType) < 0 ||
        PyType_Ready(&InletType) < 0)
        return NULL;
    empty_tuple = PyTuple_New(0);
    str_fileno = PyUnicode_InternFromString("fileno");
    str_close = PyUnicode_InternFromString("close");
    str_pipe_size = PyUnicode_InternFromString("pipe_size");
    str_acquire = PyUnicode_InternFromString("acquire");
    if (empty_tuple == NULL || str_fileno == NULL || str_close == NULL || str_pipe_size == NULL ||
        str_acquire == NULL)
        return NULL;
    socket_view_init();
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CoreType);
    Py_INCREF(&PumpType);
    Py_INCREF(&LaneType);
    Py_INCREF(&InletType);
    if (PyModule_AddObject(m, "EpollSet", (PyObject *)&CoreType) < 0 ||
        PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0 ||
        PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0 ||
        PyModule_AddObject(m, "Inlet", (PyObject *)&InletType) < 0 ||
        PyModule_AddIntConstant(m, "DIRECT_SOCKETS", sock_view_ok) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
