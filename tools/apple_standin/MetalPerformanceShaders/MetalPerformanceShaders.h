// Stand-in for <MetalPerformanceShaders/MetalPerformanceShaders.h>: only what torch's
// ATen/mps/MPSStream.h names, from Apple's documented API. Declarations only; see ../README.md.
#pragma once
#import <Metal/Metal.h>

@interface MPSCommandBuffer : NSObject <MTLCommandBuffer>
+ (instancetype)commandBufferFromCommandQueue:(id<MTLCommandQueue>)commandQueue;
@property(readonly, retain) id<MTLCommandBuffer> commandBuffer;
- (void)commitAndContinue;
@end
