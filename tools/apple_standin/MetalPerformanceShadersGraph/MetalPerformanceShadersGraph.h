// Stand-in for <MetalPerformanceShadersGraph/MetalPerformanceShadersGraph.h>: only the
// class names torch's ATen/mps/MPSStream.h uses, from Apple's documented API.
// Declarations only; see ../README.md.
#pragma once
#import <MetalPerformanceShaders/MetalPerformanceShaders.h>

@interface MPSGraph : NSObject
@end
@interface MPSGraphExecutionDescriptor : NSObject
@end
@interface MPSGraphCompilationDescriptor : NSObject
@end
