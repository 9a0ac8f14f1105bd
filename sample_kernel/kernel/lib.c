/* lib.c: the few libc functions GCC may call even in freestanding code. */
#include "kernel.h"

void *memset(void *s, int c, size_t n)
{
	volatile unsigned char *p = s;	/* volatile: not turned back into memset() */

	while (n--)
		*p++ = (unsigned char)c;
	return s;
}

void *memcpy(void *d, const void *s, size_t n)
{
	volatile unsigned char *dp = d;
	const unsigned char *sp = s;

	while (n--)
		*dp++ = *sp++;
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	volatile size_t n = 0;

	while (s[n])
		n++;
	return n;
}

/* Is `word` one of the space-separated words of the command line? */
int cmdline_has(const char *p, const char *word)
{
	while (p && *p) {
		const char *w = word;
		const char *q;

		while (*p == ' ')
			p++;
		q = p;
		while (*w && *q == *w)
			q++, w++;
		if (!*w && (*q == ' ' || *q == 0))
			return 1;
		while (*p && *p != ' ')
			p++;
	}
	return 0;
}
