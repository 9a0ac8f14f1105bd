/* console.c: output on QEMU's debug console (port 0xe9, -debugcon stdio) and
 * the exit through isa-debug-exit (iobase 0xf4). */
#include "kernel.h"
#include "raw.h"

#define DEBUGCON_PORT	0xe9
#define DEBUG_EXIT_PORT	0xf4

void console_putc(char c)
{
	outb((uint8_t)c, DEBUGCON_PORT);
}

struct sink {
	char *buf;
	size_t size, len;
};

static void put(struct sink *s, char c)
{
	if (s->len + 1 < s->size)
		s->buf[s->len] = c;
	s->len++;
}

static void put_num(struct sink *s, unsigned long v, unsigned base, int width, char padc)
{
	char tmp[24];
	int n = 0;

	do {
		tmp[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (width-- > n)
		put(s, padc);
	while (n)
		put(s, tmp[--n]);
}

/* Enough printf for a kernel: %s %c %d %u %x %p, 'l' and 'll' (hex only on
 * i386, where 64-bit division would need libgcc), zero-padded widths. */
int vsnprintk(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct sink s = { buf, size, 0 };

	for (; *fmt; fmt++) {
		int width = 0, lng = 0;
		char padc = ' ';

		if (*fmt != '%') {
			put(&s, *fmt);
			continue;
		}
		fmt++;
		if (*fmt == '0')
			padc = '0';
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			lng++;
			fmt++;
		}
		switch (*fmt) {
		case 's': {
			const char *p = va_arg(ap, const char *);
			int n = 0;

			if (!p)
				p = "(null)";
			while (p[n])
				n++;
			while (width-- > n)
				put(&s, ' ');
			while (*p)
				put(&s, *p++);
			break;
		}
		case 'c':
			put(&s, (char)va_arg(ap, int));
			break;
		case 'd': {
			long v = lng ? va_arg(ap, long) : va_arg(ap, int);

			if (v < 0) {
				put(&s, '-');
				v = -v;
			}
			put_num(&s, (unsigned long)v, 10, width, padc);
			break;
		}
		case 'u':
			put_num(&s, lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 10,
				width, padc);
			break;
		case 'x':
			if (lng >= 2 && sizeof(long) < 8) {
				unsigned long long v = va_arg(ap, unsigned long long);

				if (v >> 32) {
					put_num(&s, (unsigned long)(v >> 32), 16, width > 8 ? width - 8 : 0, padc);
					put_num(&s, (unsigned long)v, 16, 8, '0');
				} else {
					put_num(&s, (unsigned long)v, 16, width, padc);
				}
			} else {
				put_num(&s, lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 16,
					width, padc);
			}
			break;
		case 'p':
			put(&s, '0');
			put(&s, 'x');
			put_num(&s, (unsigned long)va_arg(ap, void *), 16, 0, ' ');
			break;
		case '%':
			put(&s, '%');
			break;
		default:
			put(&s, '%');
			put(&s, *fmt);
			break;
		}
	}
	if (s.size)
		s.buf[s.len < s.size ? s.len : s.size - 1] = 0;
	return (int)s.len;
}

int snprintk(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintk(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

int printk(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	int n, i;

	va_start(ap, fmt);
	n = vsnprintk(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	for (i = 0; buf[i]; i++)
		console_putc(buf[i]);
	return n;
}

void qemu_exit(unsigned code)
{
	__asm__ __volatile__("outl %0, %1" : : "a"(code), "Nd"((uint16_t)DEBUG_EXIT_PORT));
	/* not reached under QEMU with isa-debug-exit; elsewhere stop here */
	for (;;)
		__asm__ __volatile__("cli; hlt");
}
