// Stand-in for <dispatch/dispatch.h>: the few libdispatch declarations that
// csrc/mps/ops.mm and torch's ATen/mps headers use, written from Apple's documented API
// (Dispatch reference). Declarations only, for type-checking on Linux; see ../README.md.
#pragma once
#include <stddef.h>

// Apple declares these as Objective-C objects (OS_OBJECT_USE_OBJC); distinct opaque
// pointer types are enough to catch a queue passed where data is expected and vice versa.
typedef struct fq_standin_dispatch_queue_s* dispatch_queue_t;
typedef struct fq_standin_dispatch_data_s* dispatch_data_t;

#ifdef __BLOCKS__
typedef void (^dispatch_block_t)(void);
#endif

#ifdef __cplusplus
extern "C" {
#endif
#ifdef __BLOCKS__
void dispatch_sync(dispatch_queue_t queue, dispatch_block_t block);
void dispatch_async(dispatch_queue_t queue, dispatch_block_t block);
#endif
dispatch_queue_t dispatch_get_main_queue(void);
dispatch_data_t dispatch_data_create(const void* buffer, size_t size, dispatch_queue_t queue,
#ifdef __BLOCKS__
                                     dispatch_block_t destructor
#else
                                     void* destructor
#endif
);
#ifdef __cplusplus
}
#endif

// The default destructor: the data is copied at creation.
#define DISPATCH_DATA_DESTRUCTOR_DEFAULT NULL
