/* tlsconn: workload B over TLS for bench/run.py: one new TCP connection and one full TLS
 * handshake per request, from a single-threaded epoll loop (pinned to the client CPU).
 *
 * Why not wrk: wrk 4.1 keeps each connection's SSL_SESSION across reconnects (SSL_clear)
 * and offers it again, so a server that issues session tickets does abbreviated handshakes
 * and B-TLS would not measure what a new client costs. This client never offers a session
 * (unless --resume, kept to show the difference), and checks it: every handshake's
 * SSL_session_reused() is counted, so a resumed handshake cannot pass unnoticed.
 *
 * Each of -c slots loops: connect, handshake (TLS 1.3, one cipher suite, one group),
 * "GET PATH HTTP/1.1" with "Connection: close", read the response (Content-Length), send
 * close_notify, close. Latency per connection counts from connect() to the response's last
 * byte; the request part alone (write to last byte, what wrk's B latency is) and the
 * handshake (connect to Finished) are reported too.
 *
 * Output: one line "TLSCONN_JSON {...}" with the fields of bench/lua/bench.lua's WRK_JSON
 * (requests, duration_us, errors, latency_us percentiles...) plus the handshake facts and
 * the client's own CPU time, so the driver can tell when the generator is the bottleneck.
 *
 * Build: cc -O2 -o tlsconn tlsconn.c -lssl -lcrypto   (Debian: gcc libssl-dev)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { IDLE, CONNECTING, HANDSHAKE, WRITING, READING };

struct slot {
    int fd;
    SSL *ssl;
    int state;
    uint64_t t0, t_hs, t_req; /* connect() called, handshake done, request written */
    size_t sent, got;
    SSL_SESSION *sess; /* --resume only: the previous connection's session */
    char buf[8192];
};

struct samples {
    uint32_t *v;
    size_t n, cap;
};

static struct {
    const char *host, *path, *suites, *groups;
    int port, conns, resume;
    double duration, timeout, deadline_ms;
} opt = {"127.0.0.1", "/hello", "TLS_AES_256_GCM_SHA384", "X25519", 0, 50, 0, 5.0, 5.0, 50.0};

static struct {
    uint64_t requests, bytes, full, resumed, status, within;
    uint64_t e_connect, e_handshake, e_read, e_write, e_timeout;
    struct samples lat, req, hs;
    char negotiated[160];
    int mixed; /* a handshake negotiated something else than the first one */
} st;

static SSL_CTX *ctx;
static int ep;
static struct sockaddr_in addr;
static char request[512];
static size_t request_len;

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void add(struct samples *s, uint64_t us) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 65536;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v) {
            perror("realloc");
            exit(2);
        }
    }
    s->v[s->n++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* The value at rank ceil(p/100 * n), as wrk's percentile() reports it. */
static uint32_t pct(const struct samples *s, double p) {
    if (!s->n) return 0;
    size_t rank = (size_t)(p / 100.0 * (double)s->n + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > s->n) rank = s->n;
    return s->v[rank - 1];
}

static void print_pcts(const char *name, struct samples *s, int last) {
    double sum = 0;
    qsort(s->v, s->n, sizeof *s->v, cmp_u32);
    for (size_t i = 0; i < s->n; i++) sum += s->v[i];
    printf("\"%s\":{\"min\":%u,\"mean\":%.1f,\"max\":%u,\"p50\":%u,\"p90\":%u,\"p99\":%u,"
           "\"p999\":%u,\"p9999\":%u}%s",
           name, s->n ? s->v[0] : 0, s->n ? sum / (double)s->n : 0.0,
           s->n ? s->v[s->n - 1] : 0, pct(s, 50), pct(s, 90), pct(s, 99), pct(s, 99.9),
           pct(s, 99.99), last ? "" : ",");
}

static void watch(struct slot *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, op, c->fd, &ev) < 0) {
        perror("epoll_ctl");
        exit(2);
    }
}

static void drop(struct slot *c) {
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd); /* also leaves epoll */
        c->fd = -1;
    }
    c->state = IDLE;
}

static void start(struct slot *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (c->fd < 0) {
        perror("socket");
        exit(2);
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->t0 = now_us();
    c->sent = c->got = 0;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        st.e_connect++;
        close(c->fd);
        c->fd = -1;
        c->state = IDLE; /* retried on the next turn */
        return;
    }
    c->state = CONNECTING;
    watch(c, EPOLLOUT, EPOLL_CTL_ADD);
}

/* The handshake's facts, e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384 X25519 EC-prime256v1". */
static void facts(SSL *ssl, char *out, size_t n) {
    int group = SSL_get_negotiated_group(ssl);
    const char *g = group ? OBJ_nid2sn(group) : NULL;
    char key[64] = "?";
    X509 *cert = SSL_get0_peer_certificate(ssl);
    EVP_PKEY *pk = cert ? X509_get0_pubkey(cert) : NULL;
    if (pk) {
        char curve[40] = "";
        size_t len = 0;
        if (EVP_PKEY_get_group_name(pk, curve, sizeof curve, &len) && len)
            snprintf(key, sizeof key, "%s-%s", EVP_PKEY_get0_type_name(pk), curve);
        else
            snprintf(key, sizeof key, "%s-%d", EVP_PKEY_get0_type_name(pk), EVP_PKEY_get_bits(pk));
    }
    snprintf(out, n, "%s %s %s %s", SSL_get_version(ssl), SSL_get_cipher_name(ssl),
             g ? g : "?", key);
}

/* A finished response: record it, close the connection, start the next one. */
static void finish(struct slot *c, int status, int measuring) {
    uint64_t t = now_us();
    if (measuring) {
        st.requests++;
        st.bytes += c->got;
        if (status < 200 || status > 299) st.status++;
        add(&st.lat, t - c->t0);
        add(&st.req, t - c->t_req);
        add(&st.hs, c->t_hs - c->t0);
        if ((double)(t - c->t0) <= opt.deadline_ms * 1000.0) st.within++;
    }
    if (opt.resume) {
        if (c->sess) SSL_SESSION_free(c->sess);
        c->sess = SSL_get1_session(c->ssl);
    }
    SSL_shutdown(c->ssl); /* our close_notify, as wrk sends it; we do not wait for theirs */
    drop(c);
}

/* Parses what was read: 1 with *status when the whole response is in, 0 for more, -1 bad. */
static int response_done(struct slot *c, int *status) {
    c->buf[c->got < sizeof c->buf ? c->got : sizeof c->buf - 1] = 0;
    char *end = memmem(c->buf, c->got, "\r\n\r\n", 4);
    if (!end) return c->got >= sizeof c->buf - 1 ? -1 : 0;
    if (c->got < 12 || memcmp(c->buf, "HTTP/1.", 7)) return -1;
    *status = atoi(c->buf + 9);
    size_t head = (size_t)(end - c->buf) + 4, len = 0;
    char *cl = strcasestr(c->buf, "\r\ncontent-length:");
    if (!cl || cl > end) return -1; /* every bench server frames /hello by length */
    len = (size_t)strtoul(cl + 17, NULL, 10);
    if (head + len >= sizeof c->buf) return -1;
    return c->got >= head + len ? 1 : 0;
}

/* Moves a slot on as far as it can go; called on its readiness events. */
static void step(struct slot *c, int measuring) {
    int r, err, status = 0;
    switch (c->state) {
    case CONNECTING: {
        int soerr = 0;
        socklen_t len = sizeof soerr;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
        if (soerr) {
            st.e_connect++;
            drop(c);
            return;
        }
        c->ssl = SSL_new(ctx);
        SSL_set_fd(c->ssl, c->fd);
        SSL_set_connect_state(c->ssl);
        if (opt.resume && c->sess) SSL_set_session(c->ssl, c->sess);
        c->state = HANDSHAKE;
    }
    /* fall through */
    case HANDSHAKE:
        r = SSL_do_handshake(c->ssl);
        if (r != 1) {
            err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_READ) {
                watch(c, EPOLLIN, EPOLL_CTL_MOD);
            } else if (err == SSL_ERROR_WANT_WRITE) {
                watch(c, EPOLLOUT, EPOLL_CTL_MOD);
            } else {
                if (measuring) st.e_handshake++;
                ERR_clear_error();
                drop(c);
            }
            return;
        }
        c->t_hs = now_us();
        if (measuring) {
            if (SSL_session_reused(c->ssl)) {
                st.resumed++;
            } else { /* the same version, suite, group and key on every full handshake? */
                st.full++;
                char got[sizeof st.negotiated];
                facts(c->ssl, got, sizeof got);
                if (!st.negotiated[0])
                    memcpy(st.negotiated, got, sizeof got);
                else if (strcmp(got, st.negotiated))
                    st.mixed++;
            }
        }
        c->state = WRITING;
        c->t_req = now_us();
    /* fall through */
    case WRITING:
        while (c->sent < request_len) {
            r = SSL_write(c->ssl, request + c->sent, (int)(request_len - c->sent));
            if (r <= 0) {
                err = SSL_get_error(c->ssl, r);
                if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
                    watch(c, err == SSL_ERROR_WANT_WRITE ? EPOLLOUT : EPOLLIN, EPOLL_CTL_MOD);
                    return;
                }
                if (measuring) st.e_write++;
                ERR_clear_error();
                drop(c);
                return;
            }
            c->sent += (size_t)r;
        }
        c->state = READING;
        watch(c, EPOLLIN, EPOLL_CTL_MOD);
    /* fall through */
    case READING:
        for (;;) {
            r = SSL_read(c->ssl, c->buf + c->got, (int)(sizeof c->buf - 1 - c->got));
            if (r > 0) {
                c->got += (size_t)r;
                int done = response_done(c, &status);
                if (done == 1) {
                    finish(c, status, measuring);
                    return;
                }
                if (done < 0) break;
                continue;
            }
            err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_READ) return; /* session tickets come this way too */
            if (err == SSL_ERROR_WANT_WRITE) {
                watch(c, EPOLLOUT, EPOLL_CTL_MOD);
                return;
            }
            break; /* EOF or an error before the whole response */
        }
        if (measuring) st.e_read++;
        ERR_clear_error();
        drop(c);
        return;
    }
}

static void usage(const char *me) {
    fprintf(stderr,
            "usage: %s --port N [--host 127.0.0.1] [-c 50] [-d SECONDS] [--path /hello]\n"
            "       [--timeout 5] [--deadline-ms 50] [--ciphersuites TLS_AES_256_GCM_SHA384]\n"
            "       [--groups X25519] [--resume]\n",
            me);
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--resume")) {
            opt.resume = 1;
            continue;
        }
        if (!v) usage(argv[0]);
        if (!strcmp(a, "--port")) opt.port = atoi(v);
        else if (!strcmp(a, "--host")) opt.host = v;
        else if (!strcmp(a, "-c")) opt.conns = atoi(v);
        else if (!strcmp(a, "-d")) opt.duration = atof(v);
        else if (!strcmp(a, "--path")) opt.path = v;
        else if (!strcmp(a, "--timeout")) opt.timeout = atof(v);
        else if (!strcmp(a, "--deadline-ms")) opt.deadline_ms = atof(v);
        else if (!strcmp(a, "--ciphersuites")) opt.suites = v;
        else if (!strcmp(a, "--groups")) opt.groups = v;
        else usage(argv[0]);
        i++;
    }
    if (opt.port <= 0 || opt.conns <= 0 || opt.duration <= 0) usage(argv[0]);
    signal(SIGPIPE, SIG_IGN);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &addr.sin_addr) != 1) usage(argv[0]);
    request_len = (size_t)snprintf(request, sizeof request,
                                   "GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n",
                                   opt.path, opt.host, opt.port);

    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL); /* self-signed; the signature is checked */
    /* No client-side session cache: nothing is offered unless --resume hands a session on. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (!SSL_CTX_set_ciphersuites(ctx, opt.suites) || !SSL_CTX_set1_groups_list(ctx, opt.groups)) {
        fprintf(stderr, "tlsconn: bad --ciphersuites or --groups\n");
        return 2;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct slot *slots = calloc((size_t)opt.conns, sizeof *slots);
    struct epoll_event *evs = calloc((size_t)opt.conns, sizeof *evs);
    if (!slots || !evs) return 2;
    for (int i = 0; i < opt.conns; i++) slots[i].fd = -1;

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    uint64_t t_start = now_us(), t_end = t_start + (uint64_t)(opt.duration * 1e6);
    uint64_t timeout_us = (uint64_t)(opt.timeout * 1e6), next_sweep = t_start;
    for (;;) {
        uint64_t t = now_us();
        if (t >= t_end) break;
        if (t >= next_sweep) { /* (re)start idle slots, time out stuck ones */
            for (int i = 0; i < opt.conns; i++) {
                struct slot *c = &slots[i];
                if (c->state != IDLE && t - c->t0 > timeout_us) {
                    st.e_timeout++;
                    drop(c);
                }
                if (c->state == IDLE) start(c);
            }
            next_sweep = t + 10000;
        }
        int n = epoll_wait(ep, evs, opt.conns, 10);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            return 2;
        }
        for (int i = 0; i < n; i++) {
            struct slot *c = evs[i].data.ptr;
            step(c, 1);
            if (c->state == IDLE && now_us() < t_end) start(c); /* the next connection */
        }
    }
    uint64_t elapsed = now_us() - t_start;
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                 (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                 (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;

    printf("TLSCONN_JSON {\"requests\":%llu,\"duration_us\":%llu,\"bytes\":%llu,"
           "\"errors\":{\"connect\":%llu,\"read\":%llu,\"write\":%llu,\"status\":%llu,"
           "\"timeout\":%llu,\"handshake\":%llu},",
           (unsigned long long)st.requests, (unsigned long long)elapsed,
           (unsigned long long)st.bytes, (unsigned long long)(st.e_connect + st.e_handshake),
           (unsigned long long)st.e_read, (unsigned long long)st.e_write,
           (unsigned long long)st.status, (unsigned long long)st.e_timeout,
           (unsigned long long)st.e_handshake);
    print_pcts("latency_us", &st.lat, 0);
    print_pcts("request_us", &st.req, 0);
    print_pcts("handshake_us", &st.hs, 0);
    printf("\"within_deadline\":%llu,\"deadline_ms\":%g,\"fallbacks\":0,"
           "\"full_handshakes\":%llu,\"resumed_handshakes\":%llu,\"negotiated\":\"%s\","
           "\"negotiated_mixed\":%d,\"client_cpu_s\":%.3f,\"client_cpu_share\":%.3f,"
           "\"connections\":%d,\"offered_resumption\":%s}\n",
           (unsigned long long)st.within, opt.deadline_ms, (unsigned long long)st.full,
           (unsigned long long)st.resumed, st.negotiated, st.mixed, cpu,
           cpu / ((double)elapsed / 1e6), opt.conns, opt.resume ? "true" : "false");
    return 0;
}
