/* Minimal freestanding <string.h> for the Hexagon bare runtime (implemented in hexrt.c). */
#ifndef HEXRT_STRING_H_
#define HEXRT_STRING_H_
#include <stddef.h>
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
char *strncat(char *d, const char *s, size_t n);
int strcmp(const char *a, const char *b);
#endif
